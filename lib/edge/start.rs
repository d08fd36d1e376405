//! What the edge role runs: the HTTP API and its helpers (readiness, per-user rate limits, the
//! product and rate caches with their invalidations, the outbox's marker and sweeper, the
//! sold-out notices).

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use super::cart::{CartLimits, Lines, SeenCarts};
use super::checkout::{Checkouts, Known};
use super::http::{self, AppState, EdgeState};
use super::outbox::Outbox;
use crate::auth::Verifier;
use crate::bus::Bus;
use crate::catalog::CatalogCache;
use crate::config::Settings;
use crate::db::Leases;
use crate::inventory::soldout::SoldOut;
use crate::payments::token_seal::TokenSeal;
use crate::pricing::destination::RatesCache;
use crate::tasks::{TaskError, Tasks};

/// What the edge is made of.
pub struct Edge {
    pub settings: Settings,
    pub leases: Leases,
    pub bus: Bus,
    pub seal: Arc<TokenSeal>,
    pub verifier: Arc<Verifier>,
}

impl Edge {
    /// Starts the edge's tasks and listens; where it listens.
    pub async fn start(self, tasks: &mut Tasks) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(&self.settings.http.addr).await?;
        let addr = listener.local_addr()?;
        let state = self.state(tasks);
        let router = http::router(state, self.settings.http.body_limit_bytes);
        serve(tasks, listener, router, self.settings.http.drain_timeout);
        tracing::info!(%addr, "edge listening");
        Ok(addr)
    }

    /// The handlers' state, and the tasks that keep it fresh.
    fn state(&self, tasks: &mut Tasks) -> AppState {
        let edge = &self.settings.edge;
        let pool = self.leases.pool().clone();
        let limits = http::limits::UserLimits::new(edge);
        let readiness = http::health::Readiness::new(tasks.shutdown().clone());
        let (ready, bus) = (readiness.clone(), self.bus.clone());
        let pool_for_ready = pool.clone();
        tasks.until_shutdown("readiness", move |_| {
            ready.run(pool_for_ready, bus, Duration::from_secs(1))
        });
        let idle = limits.clone();
        tasks.until_shutdown("rate-limits", move |token| async move {
            loop {
                tokio::select! {
                    () = token.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(60)) => idle.forget_idle(),
                }
            }
        });
        let rates = RatesCache::new(pool.clone(), edge.rates_cache_ttl);
        let catalog = CatalogCache::new(
            pool.clone(),
            edge.product_cache_capacity,
            edge.product_cache_ttl,
        );
        let (client, products, dropped) =
            (self.bus.client().clone(), catalog.clone(), rates.clone());
        tasks.until_shutdown("cache-invalidation", move |token| {
            crate::catalog::run_invalidation(client, products, dropped, token)
        });
        let sold_out = SoldOut::new(edge.sold_out_ttl);
        let (client, memory) = (self.bus.client().clone(), sold_out.clone());
        tasks.until_shutdown("sold-out-notices", move |token| {
            memory.follow(client, token)
        });
        let outbox = self.outbox(tasks);
        let seen = SeenCarts::new(edge.seen_carts_capacity, edge.seen_carts_ttl);
        let linger = self.settings.database.group_linger;
        let known = Known {
            rates: rates.clone(),
            catalog: catalog.clone(),
            seen: seen.clone(),
            sold_out: sold_out.clone(),
        };
        let checkouts = Checkouts::new(
            self.leases.clone(),
            self.seal.clone(),
            outbox.clone(),
            known,
            linger,
        );
        AppState::new(EdgeState {
            pool,
            leases: self.leases.clone(),
            lines: Lines::new(self.leases.clone(), linger, seen),
            bus: self.bus.clone(),
            checkouts,
            outbox,
            sold_out,
            limits,
            readiness,
            admission: http::Admission::new(edge.max_in_flight, edge.admission_wait),
            cart_limits: CartLimits {
                max_lines: edge.cart_max_lines,
            },
            catalog,
            rates,
            verifier: self.verifier.clone(),
            webhooks: crate::payments::webhooks::Verifiers::from_settings(&self.settings.psp),
            psp: self.settings.psp.clone(),
            seal: self.seal.clone(),
            merchant_webhooks: self.settings.webhooks.clone(),
        })
    }

    /// The outbox, with its marker and its sweeper.
    fn outbox(&self, tasks: &mut Tasks) -> Outbox {
        let edge = self.settings.edge.clone();
        let (outbox, marks) = Outbox::new(self.leases.pool().clone(), self.bus.clone());
        let marker = outbox.clone();
        tasks.until_shutdown("outbox-marker", move |token| {
            marker.run_marker(marks, edge.outbox_mark_every, token)
        });
        let sweeper = outbox.clone();
        tasks.until_shutdown("outbox-sweeper", move |token| {
            sweeper.run_sweeper(
                edge.outbox_interval,
                edge.outbox_grace,
                edge.outbox_max_backoff,
                token,
            )
        });
        outbox
    }
}

/// Serves the API until shutdown. Graceful shutdown waits for every connection; a client that
/// never hangs up must not keep the process alive, so the drain has a deadline.
fn serve(tasks: &mut Tasks, listener: TcpListener, router: axum::Router, drain: Duration) {
    let token = tasks.shutdown().clone();
    tasks.spawn("edge", async move {
        let serving = axum::serve(listener, router)
            .with_graceful_shutdown(token.clone().cancelled_owned())
            .into_future();
        let deadline = async {
            token.cancelled().await;
            tokio::time::sleep(drain).await;
        };
        tokio::select! {
            served = serving => served.map_err(TaskError::from),
            () = deadline => {
                tracing::warn!(?drain, "HTTP drain deadline passed; closing the connections left");
                Ok(())
            }
        }
    });
}
