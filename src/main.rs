use std::process::ExitCode;

use clap::Parser;
use flannel::cli::{normalize_args, Opts};
use flannel::error_chain::Chain;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("mk-docker-opts") {
        return flannel::docker_opts::main(&args[2..]);
    }
    if args.get(1).map(String::as_str) == Some("install-cni") {
        return flannel::install_cni::main(&args[2..]);
    }
    if args.get(1).map(String::as_str) == Some("status") {
        return flannel::status::client::main(&args[2..]);
    }
    let opts = Opts::parse_from(normalize_args(std::env::args()));
    let default_level = match opts.verbosity {
        0 => "info",
        1..=4 => "debug",
        _ => "trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            // kube-client logs every failed request as an error; ours say what it means
            // (waiting for the API server, retrying), once.
            EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                EnvFilter::new(format!("{default_level},kube_client::client::builder=off"))
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    tracing::info!("flanneld {} starting", env!("CARGO_PKG_VERSION"));
    opts.ignored_glog_flags()
        .iter()
        .for_each(|w| tracing::warn!("{w}"));
    raise_open_file_limit();

    // Kubernetes mode's control plane (one watch, a few patches) fits on one thread, and each
    // extra worker thread brings its own malloc arena: one thread lowers its peak memory. The
    // data paths of the udp and wireguard backends run on threads of their own either way.
    let built = if opts.kube_subnet_mgr {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    };
    let runtime = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flanneld: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        tokio::select! {
            r = flannel::daemon::run(opts) => r,
            s = shutdown_signal() => {
                tracing::info!("{s}: exiting; the lease and the data plane stay in place");
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let e = Chain(&e);
            tracing::error!("{e}");
            eprintln!("flanneld: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft limit on open files to the hard limit, as Go programs (flannel among them)
/// do at start: the usual soft default of 1024 is a relic of select(2), which this daemon does
/// not use, and running out of descriptors stops renewals and watches along with the rest.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let result = getrlimit(Resource::RLIMIT_NOFILE).and_then(|(soft, hard)| {
        if soft < hard {
            setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
        }
        Ok((soft, hard))
    });
    match result {
        Ok((soft, hard)) if soft < hard => {
            tracing::info!("raised the open-file limit (RLIMIT_NOFILE) from {soft} to {hard}")
        }
        Ok((soft, _)) => tracing::debug!("open-file limit (RLIMIT_NOFILE): {soft}"),
        Err(e) => tracing::warn!("cannot raise the open-file limit (RLIMIT_NOFILE): {e}"),
    }
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
