//! `cargo xtask verifier`: what each kernel's verifier makes of the
//! programs, in one table: instructions verified per program (against the
//! 1M bound and the tests' budget of 200k) and the memory charged to the
//! loading process's cgroup while they load, on this host and on the VM
//! kernels. Kernel builds of one version have differed 17-fold here, so a
//! regression is one command away.

use std::process::Stdio;

use crate::{setup, toolchain, vm};

#[derive(Debug, clap::Args)]
pub struct VerifierArgs {
    #[command(flatten)]
    vm: vm::VmArgs,
    /// Only this host's kernel.
    #[arg(long)]
    no_vm: bool,
}

/// The loader test that prints the figures (tests/tests/loader.rs).
const TEST: &str = "the_programs_verify_well_within_the_verifiers_bound";

pub fn run(args: &VerifierArgs) -> anyhow::Result<()> {
    let route = setup::ensure(true)?;
    let out = toolchain::cargo(&route)
        .args(["test", "-p", "tracegap-tests", "--test", "loader", "--"])
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .stderr(Stdio::inherit())
        .output()?;
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(vm::verifier_line)
        .map(str::to_owned)
        .collect();
    let host_ok = out.status.success();
    let guests = if args.no_vm {
        Ok(Vec::new())
    } else {
        vm::run_tests(&args.vm, &["loader"])
    };
    if let Ok(g) = &guests {
        lines.extend(g.iter().cloned());
    }
    let table = table(&lines);
    println!("\n{table}");
    let path = toolchain::workspace_root().join("target/verifier.md");
    std::fs::write(&path, &table)?;
    println!("verifier: the table is in {}", path.display());
    anyhow::ensure!(
        host_ok,
        "the loader test failed on this host (its output is above)"
    );
    guests.map(|_| ())
}

/// A Markdown table of the [`vm::VERIFIER_LINE`]s.
fn table(lines: &[String]) -> String {
    let mut t = String::from(
        "| kernel | program | instructions verified | of the 1M bound | memory peak while loading (all programs) | load time |\n\
         | --- | --- | ---: | ---: | ---: | ---: |\n",
    );
    for line in lines {
        let mut w = line.split_whitespace().skip(1);
        let (Some(kernel), Some(program)) = (w.next(), w.next()) else {
            continue;
        };
        let kv: std::collections::BTreeMap<&str, &str> =
            w.filter_map(|x| x.split_once('=')).collect();
        let get = |k: &str| kv.get(k).copied().unwrap_or("-");
        let share = get("insns")
            .parse::<f64>()
            .map(|n| format!("{:.1}%", n / 10_000.0))
            .unwrap_or_else(|_| "-".into());
        t.push_str(&format!(
            "| {kernel} | {program} | {} | {share} | {} MiB (child alone: {} MiB) | {} ms |\n",
            get("insns"),
            get("peak_mib"),
            get("baseline_mib"),
            get("load_ms"),
        ));
    }
    t
}
