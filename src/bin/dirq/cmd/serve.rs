//! `dirq serve`: the HTTP API and web console of `dirq::serve` over a spool root.

use crate::output::CliResult;

#[cfg(feature = "serve")]
pub(crate) fn serve(
    root: &std::path::Path,
    listen: std::net::SocketAddr,
    token_file: Option<&std::path::Path>,
    max_body: u64,
    durability: dirq::Durability,
) -> CliResult {
    use std::io::Write;

    use crate::output::{context, stdout_error, unless_broken_pipe};

    if let Some(path) = token_file {
        warn_if_readable_by_others(path);
    }
    let token = token_file
        .map(|path| {
            std::fs::read_to_string(path).map_err(context(format!(
                "failed to read the token file {}",
                path.display()
            )))
        })
        .transpose()?;
    let mut config = dirq::serve::ServeConfig::new(root);
    config
        .listen(listen)
        .max_body(max_body)
        .durability(durability);
    if let Some(token) = &token {
        if token.trim().is_empty() {
            return Err(format!(
                "the token file {} is empty",
                token_file.map_or_else(String::new, |p| p.display().to_string())
            )
            .into());
        }
        config.token(token);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("dirq-serve")
        .build()
        .map_err(context("failed to start the async runtime"))?;
    runtime.block_on(async {
        let server = config.bind().await?;
        let mut out = std::io::stdout().lock();
        let mut banner = format!("listening on http://{}\n", server.local_addr());
        if server.is_read_only() {
            banner.push_str("read-only: no --token-file\n");
        }
        out.write_all(banner.as_bytes())
            .and_then(|()| out.flush())
            .or_else(unless_broken_pipe)
            .map_err(stdout_error)?;
        drop(out);
        let stop = stop_signal()?;
        server.run_until(stop).await?;
        CliResult::Ok(())
    })
}

/// Warns when the token file can be read by users other than its owner: anyone who can
/// read it can change every queue.
#[cfg(all(feature = "serve", unix))]
fn warn_if_readable_by_others(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "the token file is readable by others: chmod 600 it"
            );
        }
    }
}

#[cfg(all(feature = "serve", not(unix)))]
fn warn_if_readable_by_others(_path: &std::path::Path) {}

/// Completes at the first SIGTERM or SIGINT.
#[cfg(all(feature = "serve", unix))]
fn stop_signal() -> Result<impl std::future::Future<Output = ()>, crate::output::Context> {
    use tokio::signal::unix::{signal, SignalKind};
    let failed = crate::output::context("failed to install the signal handlers");
    let mut term = signal(SignalKind::terminate()).map_err(failed)?;
    let mut int = signal(SignalKind::interrupt()).map_err(crate::output::context(
        "failed to install the signal handlers",
    ))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
    })
}

/// Completes at the first Ctrl-C.
#[cfg(all(feature = "serve", not(unix)))]
fn stop_signal() -> Result<impl std::future::Future<Output = ()>, crate::output::Context> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

#[cfg(not(feature = "serve"))]
pub(crate) fn not_built() -> CliResult {
    Err(
        "dirq serve is not built into this dirq: build the full binary with \
         `cargo install --path . --all-features` (or `--features serve`)"
            .into(),
    )
}
