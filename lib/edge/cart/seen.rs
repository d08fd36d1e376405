//! What this edge process last wrote to each cart: its owner, promotion code and lines.
//!
//! A buyer adds to the cart and checks out moments later, usually through the same edge. The
//! checkout prices what the edge remembers instead of reading the cart again, and the
//! acceptance checks under the cart's lock that the cart and its products are still what was
//! priced (`edge.accept_checkout`). The memory is a hint, never the truth: a stale or missing
//! entry costs the read it would have saved, nothing else.

use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;
use uuid::Uuid;

use super::pricing::Item;

/// A cart as this edge last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenCart {
    pub user_id: String,
    pub promo_code: Option<String>,
    /// In the order the lines were added.
    pub items: Vec<Item>,
}

/// A bounded, expiring memory of carts by id (see the module's documentation).
#[derive(Clone)]
pub struct SeenCarts {
    carts: Cache<Uuid, Arc<SeenCart>>,
}

impl SeenCarts {
    /// At most `capacity` carts, each kept at most `ttl` after its last write (zero
    /// capacity: remember nothing, so every checkout reads its cart).
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        Self {
            carts: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// Remembers what a write left in the cart.
    pub async fn remember(&self, cart_id: Uuid, cart: SeenCart) {
        self.carts.insert(cart_id, Arc::new(cart)).await;
    }

    /// Forgets a cart changed in a way not remembered.
    pub async fn forget(&self, cart_id: Uuid) {
        self.carts.invalidate(&cart_id).await;
    }

    /// Takes the cart out of the memory for a checkout of `user_id`'s: a checkout ends the
    /// cart's life as remembered, whether it is accepted or the cart turns out changed.
    pub async fn take(&self, cart_id: Uuid, user_id: &str) -> Option<Arc<SeenCart>> {
        self.carts
            .remove(&cart_id)
            .await
            .filter(|cart| cart.user_id == user_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cart(user: &str) -> SeenCart {
        SeenCart {
            user_id: user.to_owned(),
            promo_code: None,
            items: vec![("TEE".to_owned(), 2)],
        }
    }

    #[tokio::test]
    async fn a_cart_is_taken_once_and_only_by_its_owner() {
        let seen = SeenCarts::new(10, Duration::from_secs(60));
        let id = Uuid::now_v7();
        seen.remember(id, cart("alice")).await;
        assert_eq!(seen.take(id, "bob").await, None, "another buyer's checkout");
        seen.remember(id, cart("alice")).await;
        assert_eq!(
            seen.take(id, "alice").await.as_deref(),
            Some(&cart("alice"))
        );
        assert_eq!(seen.take(id, "alice").await, None, "taken already");
    }

    #[tokio::test]
    async fn a_forgotten_cart_is_not_taken() {
        let seen = SeenCarts::new(10, Duration::from_secs(60));
        let id = Uuid::now_v7();
        seen.remember(id, cart("alice")).await;
        seen.forget(id).await;
        assert_eq!(seen.take(id, "alice").await, None);
    }
}
