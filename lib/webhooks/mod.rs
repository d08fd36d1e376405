//! Merchant webhooks: every order event delivered to the shop's own systems, signed as the
//! Standard Webhooks specification says (standardwebhooks.com), retried and replayable. Fed
//! from JetStream by a step of the order role (`feed`), sent by its dispatcher (`dispatch`),
//! never from a request's path.

pub mod dispatch;
pub mod endpoints;
pub mod feed;
pub mod log;
pub mod signing;
pub mod target;

use std::sync::Arc;

pub use feed::FeedStep;

/// What the order role runs for webhooks: the feed step and the dispatcher.
pub fn start(
    tasks: &mut crate::tasks::Tasks,
    consuming: &crate::tasks::Consuming,
    settings: &crate::config::Settings,
    leases: &crate::db::Leases,
    seal: &Arc<crate::payments::token_seal::TokenSeal>,
) {
    tasks.step(
        consuming,
        FeedStep {
            leases: leases.clone(),
        },
    );
    let dispatcher = dispatch::Dispatcher {
        pool: leases.pool().clone(),
        seal: seal.clone(),
        settings: settings.webhooks.clone(),
        id: uuid::Uuid::new_v4(),
    };
    tasks.until_shutdown("webhook-dispatcher", move |token| dispatcher.run(token));
}
