//! The loader's errors: a program the kernel refuses is a start-up error
//! that names the program and carries the verifier's log.

use std::path::{Path, PathBuf};

use tracegap_agent::ebpf::{Error, Observer};
use tracegap_tests::{TempDir, privileged, run};

/// The assembly of the programs the verifier must refuse.
pub fn rejected_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bpf/rejected.s")
}

fn llvm_mc() -> Option<PathBuf> {
    ["/usr/lib/llvm-22/bin/llvm-mc", "/usr/bin/llvm-mc"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

#[test]
fn a_program_the_verifier_rejects_is_named_with_the_verifier_log() -> anyhow::Result<()> {
    if !privileged("a_program_the_verifier_rejects_is_named_with_the_verifier_log") {
        return Ok(());
    }
    // In the VM tests the object comes assembled (no LLVM in the guest).
    let bytes = match std::env::var_os("TRACEGAP_REJECTED_OBJECT") {
        Some(path) => std::fs::read(path)?,
        None => {
            let Some(mc) = llvm_mc() else {
                // llvm-22 comes with `cargo xtask setup`'s llvm-22-dev.
                eprintln!(
                    "SKIPPED a_program_the_verifier_rejects_is_named_with_the_verifier_log: no llvm-mc"
                );
                return Ok(());
            };
            let dir = TempDir::new("rejected")?;
            let object = dir.path().join("rejected.o");
            run(std::process::Command::new(mc)
                .args(["-triple", "bpfel", "-filetype=obj", "-o"])
                .arg(&object)
                .arg(rejected_source()))?;
            std::fs::read(&object)?
        }
    };
    let err = match Observer::load_object(&bytes) {
        Ok(_) => panic!("the kernel accepted a program that reads an unset register"),
        Err(e) => e,
    };
    assert!(
        matches!(
            err,
            Error::Load {
                program: "tracegap_ingress",
                ..
            }
        ),
        "{err:?}"
    );
    let text = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(text.contains("tracegap_ingress"), "{text}");
    assert!(
        text.contains("R5 !read_ok"),
        "the verifier's own words: {text}"
    );
    Ok(())
}
