use clap::Parser as _;
use tracegap_agent::cli::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracegap_agent::remote::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_env_filter(cli.log_filter())
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => {
                let stop = async {
                    match tracegap_agent::shutdown::signal_received().await {
                        Ok(sig) => tracing::info!(signal = sig, "stopping"),
                        Err(e) => tracing::error!(error = %e, "cannot wait for signals; stopping"),
                    }
                };
                tracegap_agent::agent::run(args.config()?, stop, None).await
            }
            Command::Observe(args) => tracegap_agent::observe::run(args).await,
            Command::Report(args) => match &args.prometheus {
                Some(url) => {
                    tracegap_agent::prometheus::report::print(
                        url,
                        args.window,
                        args.json,
                        &args.prometheus_access.access(),
                    )
                    .await
                }
                None => tracegap_agent::report::fetch_and_print(&args.agent, args.json),
            },
            Command::Quality(args) => {
                let stop = async {
                    if let Ok(sig) = tracegap_agent::shutdown::signal_received().await {
                        tracing::info!(signal = sig, "stopping");
                    }
                };
                tracegap_agent::prometheus::serve::run(args.config(), stop, None).await
            }
        }
    })
}
