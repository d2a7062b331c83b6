//! A configuration's credentials: the secret cache ([`crate::cache`]) and the OAuth2 tokens
//! minted from client credentials held in it ([`crate::oauth2`]), and where each route finds
//! its own.
//!
//! A route's [`Slot`] is either a key rendered in a secret's entry or an OAuth2 access token.
//! Both engines go through [`Slot::current`] (one atomic load, no lock, no I/O),
//! [`Slot::credential`], [`Slot::refresh_now`] (the 401 path) and [`Slot::missing`], and need
//! not know which.
//!
//! [`Credentials`] owns both halves, built together at start ([`Credentials::new`]) and renewed
//! together by a reload ([`Credentials::renew`]), so the admin endpoints, which read one
//! `ArcSwap` of it, never see a new cache with the old tokens.

use std::sync::Arc;
use std::time::Duration;

use crate::cache::{Binding, Loaded, Refreshed, SecretCache};
use crate::config::RouteConfig;
use crate::inject::Credential;
use crate::metrics::Metrics;
use crate::oauth2::{Exchange, Token, Tokens};
use crate::secrets::Sources;

/// Where a route finds its credential.
#[derive(Debug, Clone)]
pub enum Slot {
    /// A key rendered in a secret's entry.
    Key(Binding),
    /// An OAuth2 route's access token (its `Loaded` holds only its credential).
    Token(Arc<Token>),
}

impl Slot {
    /// The route's credential in `loaded`.
    #[inline]
    pub fn credential<'a>(&self, loaded: &'a Loaded) -> Option<&'a Credential> {
        match self {
            Slot::Key(b) => b.credential(loaded),
            Slot::Token(_) => loaded.creds.first(),
        }
    }

    /// The credentials in force: one atomic load, no lock, no I/O (a token past its expiry is
    /// none).
    #[inline]
    pub fn current(&self) -> Option<Arc<Loaded>> {
        match self {
            Slot::Key(b) => b.entry.current(),
            Slot::Token(t) => t.current(),
        }
    }

    /// The 401 path: fresher credentials than `seen` if they can be had (see
    /// [`crate::cache::Entry::refresh_now`] and [`Token::refresh_now`]).
    pub async fn refresh_now(&self, seen: &Arc<Loaded>) -> Option<Arc<Loaded>> {
        match self {
            Slot::Key(b) => b.entry.refresh_now(seen).await,
            Slot::Token(t) => t.refresh_now(seen).await,
        }
    }

    /// Why [`Slot::current`] has nothing: the last error, or that it is still being fetched
    /// (or minted).
    pub fn missing(&self) -> String {
        match self {
            Slot::Key(b) => b.entry.missing(),
            Slot::Token(t) => t.missing(),
        }
    }
}

/// The secret cache and the OAuth2 tokens minted from it, built and replaced together.
#[derive(Debug)]
pub struct Credentials {
    /// The secret cache.
    pub secrets: SecretCache,
    /// The OAuth2 tokens.
    pub tokens: Tokens,
}

impl Credentials {
    /// The credentials of `routes`: one cache entry per (role, secret id, stage), each read
    /// from its role's source in `sources`, and one token per OAuth2 route, minted through
    /// `client`. Returns each route's slot (in route order). Nothing is fetched or minted until
    /// [`Credentials::start`].
    pub fn new(
        routes: &[RouteConfig],
        sources: &Sources,
        metrics: Arc<Metrics>,
        client: &Arc<dyn Exchange>,
    ) -> (Credentials, Vec<Slot>) {
        let (secrets, bindings) = SecretCache::new(routes, sources, metrics.clone());
        Credentials::with_tokens(secrets, routes, bindings, client, &metrics)
    }

    /// The credentials of a reloaded configuration, built from these: the cache is renewed
    /// ([`SecretCache::renew`]: secrets kept are not fetched again when `same_source`), and,
    /// when `same_source`, each token whose route mints and presents it the same way starts
    /// with the token in force ([`Tokens::keep`]). The background tasks of these stop now;
    /// they keep serving the requests still in flight on the old routes. Start the new ones
    /// with [`Credentials::start`] (after [`Credentials::warm`], to have the new secrets first).
    pub fn renew(
        &self,
        routes: &[RouteConfig],
        sources: &Sources,
        same_source: bool,
        metrics: Arc<Metrics>,
        client: &Arc<dyn Exchange>,
    ) -> (Credentials, Vec<Slot>) {
        self.tokens.stop();
        let (secrets, bindings) = self
            .secrets
            .renew(routes, sources, same_source, metrics.clone());
        let (new, slots) = Credentials::with_tokens(secrets, routes, bindings, client, &metrics);
        if same_source {
            new.tokens.keep(&self.tokens);
        }
        (new, slots)
    }

    fn with_tokens(
        secrets: SecretCache,
        routes: &[RouteConfig],
        bindings: Vec<Binding>,
        client: &Arc<dyn Exchange>,
        metrics: &Arc<Metrics>,
    ) -> (Credentials, Vec<Slot>) {
        let (tokens, each) = Tokens::new(routes, &bindings, client, metrics);
        let slots = bindings
            .into_iter()
            .zip(each)
            .map(|(b, token)| match token {
                Some(t) => Slot::Token(t),
                None => Slot::Key(b),
            })
            .collect();
        (Credentials { secrets, tokens }, slots)
    }

    /// Fetches the secrets new to the cache, waiting at most `within` ([`SecretCache::warm`]).
    pub async fn warm(&mut self, within: Duration) {
        self.secrets.warm(within).await;
    }

    /// Starts the background tasks: one per cache entry, then one per token.
    pub fn start(&mut self) {
        self.secrets.start();
        self.tokens.start();
    }

    /// Whether every secret has a usable value, and every OAuth2 route a token.
    pub fn ready(&self) -> bool {
        self.secrets.ready() && self.tokens.ready()
    }

    /// `POST /refresh`: see [`SecretCache::refresh_on_demand`].
    pub async fn refresh_on_demand(&self, only: Option<&str>) -> Option<Vec<Refreshed>> {
        self.secrets.refresh_on_demand(only).await
    }
}
