//! The parts of a running proxy built from a configuration, the same at start
//! ([`crate::server::run`]) and at a reload ([`crate::reload`]): the secret sources (one per
//! role), the client OAuth2 routes mint tokens with, and the warnings a configuration earns.

use std::sync::Arc;

use crate::config::{Config, SourceConfig};
use crate::forward;
use crate::secrets::aws::AwsSource;
use crate::secrets::file::FileSource;
use crate::secrets::Sources;
use crate::uri::is_loopback;

/// Builds the secret sources the config names: for `aws`, one Secrets Manager client over the
/// base credentials and one per distinct role the routes read with.
pub async fn sources(config: &Config) -> Sources {
    let mut sources = match &config.source {
        SourceConfig::Aws(settings) => {
            Sources::single(Arc::new(AwsSource::connect(settings, None).await))
        }
        SourceConfig::File(path) => Sources::single(Arc::new(FileSource::new(path.clone()))),
    };
    add_role_sources(config, &mut sources).await;
    sources
}

/// Adds to `sources` a client for each role a route of `config` reads with and `sources` has
/// not got yet (a reload keeps the others, with their cached role credentials).
pub async fn add_role_sources(config: &Config, sources: &mut Sources) {
    let SourceConfig::Aws(settings) = &config.source else {
        return;
    };
    for role in config.routes.iter().filter_map(|r| r.role.as_ref()) {
        if !sources.has(role) {
            let source = AwsSource::connect(settings, Some(role)).await;
            sources.insert(role.clone(), Arc::new(source));
        }
    }
}

/// The client OAuth2 routes mint their tokens with: HTTP/1.1, like any small API.
pub fn token_client(
    config: &Config,
    tls: &rustls::ClientConfig,
) -> Arc<dyn crate::oauth2::Exchange> {
    Arc::new(forward::client_with(
        config.connect_timeout,
        tls.clone(),
        false,
    ))
}

/// Warns about each route whose upstream is plain http on another host.
pub fn warn_plain_http(config: &Config) {
    for r in &config.routes {
        if r.upstream.scheme == http::uri::Scheme::HTTP && !is_loopback(r.upstream.authority.host())
        {
            tracing::warn!(route = %r.name, upstream = %r.upstream,
                "upstream is plain http: the key crosses the network unencrypted");
        }
    }
}
