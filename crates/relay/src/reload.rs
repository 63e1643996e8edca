//! Live reloads without a restart: the certificate pair and the allow-list file.
//!
//! Files are watched by polling their metadata (following symlinks), which also sees the
//! `..data` symlink swap Kubernetes uses for Secrets and ConfigMaps and certbot's renewals;
//! SIGHUP forces a reload. A change is applied only once the files have stopped changing
//! (debounce), and only if the new content is valid: a bad certificate pair or a malformed
//! allow-list is refused with a log line and the old one stays in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::signal::unix::{signal, SignalKind};

use crate::allow::ranges::{self, Ranges, Service};
use crate::allow::{AllowList, AllowSource};
use crate::edge::tls::CertResolver;
use crate::metrics::Metrics;

/// How often watched files' metadata is checked.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// A change is applied once the files have looked the same for this long, so a half-written
/// pair (certificate replaced, key not yet) is never loaded.
pub const DEBOUNCE: Duration = Duration::from_millis(500);
/// How often the expiry warning is repeated while it applies.
const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

/// What identifies a file's content cheaply: modification time, size, inode.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    // metadata() follows symlinks: a swapped `..data` link shows as a different inode.
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Poll `paths` and SIGHUP; calls `reload` after a debounced change or a signal, forever.
pub(crate) async fn watch<F, Fut>(paths: Vec<PathBuf>, what: &'static str, mut reload: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut hup = signal(SignalKind::hangup()).ok();
    let stamps = |paths: &[PathBuf]| paths.iter().map(|p| stamp(p)).collect::<Vec<_>>();
    let mut applied = stamps(&paths);
    loop {
        let hangup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = hangup => {
                tracing::info!(what, "SIGHUP: reloading");
                applied = stamps(&paths);
                reload().await;
                continue;
            }
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
        }
        let now = stamps(&paths);
        if now == applied {
            continue;
        }
        // Changed: wait until it stops changing.
        let mut settled = now;
        loop {
            tokio::time::sleep(DEBOUNCE).await;
            let again = stamps(&paths);
            if again == settled {
                break;
            }
            settled = again;
        }
        applied = settled;
        tracing::info!(what, "file changed: reloading");
        reload().await;
    }
}

/// Keep the served certificate in step with `cert`/`key`; warn about expiry.
pub async fn watch_certificate(
    resolver: Arc<CertResolver>,
    cert: PathBuf,
    key: PathBuf,
    metrics: Arc<Metrics>,
) {
    let paths = vec![cert.clone(), key.clone()];
    let expiry = {
        let resolver = resolver.clone();
        let metrics = metrics.clone();
        async move {
            // `run` has reported the certificate at start-up: repeat only from the next check on.
            loop {
                tokio::time::sleep(EXPIRY_CHECK_INTERVAL).await;
                crate::edge::tls::report_expiry(&resolver.current(), &metrics);
            }
        }
    };
    let reloads = watch(paths, "certificate", || {
        let (resolver, cert, key, metrics) =
            (resolver.clone(), cert.clone(), key.clone(), metrics.clone());
        async move {
            let loaded =
                tokio::task::spawn_blocking(move || crate::edge::tls::load_pem(&cert, &key)).await;
            match loaded {
                Ok(Ok(new)) => {
                    tracing::info!(subject = %new.info.subject, sha256 = %new.info.sha256, "new certificate in use for new connections");
                    crate::edge::tls::report_expiry(&new, &metrics);
                    resolver.store(new);
                    metrics.reload("certificate", true);
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "new certificate refused; the previous one stays in use");
                    metrics.reload("certificate", false);
                }
                Err(e) => tracing::error!(error = %e, "certificate reload task failed"),
            }
        }
    });
    tokio::join!(expiry, reloads);
}

/// Keep the allow-list in step with `--allow-file` (plus the fixed `--allow`/presets).
pub async fn watch_allow_list(
    current: Arc<ArcSwap<AllowList>>,
    source: Arc<AllowSource>,
    file: PathBuf,
    metrics: Arc<Metrics>,
) {
    watch(vec![file], "allow-list", || {
        let (current, source, metrics) = (current.clone(), source.clone(), metrics.clone());
        async move {
            let built = tokio::task::spawn_blocking(move || source.build()).await;
            match built {
                Ok(Ok(list)) => {
                    tracing::info!(admitted = %list.describe(), "allow-list reloaded");
                    current.store(Arc::new(list));
                    metrics.reload("allow_list", true);
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "new allow-list refused; the previous one stays in force");
                    metrics.reload("allow_list", false);
                }
                Err(e) => tracing::error!(error = %e, "allow-list reload task failed"),
            }
        }
    })
    .await;
}

/// `--refresh-ranges`: start from the cached list, then check the service's version every
/// `interval` and download the list only when it changed. Any failure keeps what is in force.
pub async fn refresh_ranges(
    current: Arc<ArcSwap<AllowList>>,
    source: Arc<AllowSource>,
    service: Service,
    state_dir: PathBuf,
    interval: Duration,
    metrics: Arc<Metrics>,
) {
    let dir = state_dir.clone();
    if let Ok(Some(cached)) = tokio::task::spawn_blocking(move || ranges::load_cache(&dir)).await {
        tracing::info!(version = %cached.version, networks = cached.networks.len(), "exchange-online ranges from the cache");
        apply_ranges(&current, &source, cached, &metrics);
    } else {
        tracing::info!("no cached exchange-online ranges: the built-in snapshot applies until the service answers");
    }
    loop {
        let known = source
            .exchange_online
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|r| r.version.clone());
        match service.version().await {
            Ok(v) if Some(&v) == known.as_ref() => {
                tracing::debug!(version = %v, "exchange-online ranges unchanged");
            }
            Ok(v) => match service.fetch(&v).await {
                Ok(fresh) => {
                    tracing::info!(version = %v, networks = fresh.networks.len(), "new exchange-online ranges from the endpoint service");
                    let (dir, copy) = (state_dir.clone(), fresh.clone());
                    if let Ok(Err(e)) =
                        tokio::task::spawn_blocking(move || ranges::save_cache(&dir, &copy)).await
                    {
                        tracing::warn!(error = %e, "cannot cache the ranges");
                    }
                    apply_ranges(&current, &source, fresh, &metrics);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "keeping the exchange-online ranges in force");
                    metrics.reload("ranges", false);
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "keeping the exchange-online ranges in force");
                metrics.reload("ranges", false);
            }
        }
        if let Some(r) = source
            .exchange_online
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            metrics.set_ranges(&r.version, r.age());
        }
        tokio::time::sleep(interval).await;
    }
}

fn apply_ranges(
    current: &ArcSwap<AllowList>,
    source: &AllowSource,
    fresh: Ranges,
    metrics: &Metrics,
) {
    let previous = source
        .exchange_online
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .replace(fresh.clone());
    match source.build() {
        Ok(list) => {
            tracing::info!(admitted = %list.describe(), "allow-list updated");
            current.store(Arc::new(list));
            metrics.set_ranges(&fresh.version, fresh.age());
            metrics.reload("ranges", true);
        }
        Err(e) => {
            // Cannot happen with a validated list, but never leave a half-applied state.
            *source
                .exchange_online
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = previous;
            tracing::error!(error = %e, "new ranges refused");
            metrics.reload("ranges", false);
        }
    }
}
