//! Batch-native steps: one bad message in a batch does not fail its neighbours, and the
//! inbox keeps a batch idempotent.

use checkout::app::Role;
use checkout::domain::{Address, Sku};
use checkout::saga::events::{Checkout, Event, Line};
use checkout::saga::runner::Outgoing;
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::helpers::TestApp;

fn checkout_of(sku: &str, qty: i32) -> Checkout {
    let price = Decimal::new(1000, 2);
    Checkout {
        order_id: Uuid::now_v7(),
        user_id: "batcher".into(),
        cart_id: Uuid::new_v4(),
        items: vec![Line {
            sku: Sku::parse(sku).expect("sku"),
            qty,
            unit_price: price,
            line_total: price * Decimal::from(qty),
            discount: Decimal::ZERO,
            tax: Decimal::ZERO,
        }],
        subtotal: price * Decimal::from(qty),
        discount: Decimal::ZERO,
        tax: Decimal::ZERO,
        shipping: Decimal::ZERO,
        total: price * Decimal::from(qty),
        currency: "USD".into(),
        payment_token: "tok_visa".into(),
        address: Some(Address {
            name: "Ada".into(),
            line1: "1 Main St".into(),
            city: "London".into(),
            region: None,
            postal_code: "N1".into(),
            country: "GB".into(),
        }),
        requested_at: chrono::Utc::now(),
        promo_code: None,
        shipping_method: None,
    }
}

#[tokio::test]
async fn one_bad_message_in_a_batch_does_not_fail_its_neighbours() {
    // No reserve role yet: the requests queue up and are pulled together as one batch.
    let roles = [
        Role::Psp,
        Role::Edge,
        Role::Authorize,
        Role::Order,
        Role::Compensate,
    ];
    let app = TestApp::spawn_roles(&roles, |_| {}).await;
    app.product("TEE", "10.00", 10).await;
    let good: Vec<Checkout> = (0..4).map(|_| checkout_of("TEE", 1)).collect();
    // A line of zero units: the database refuses the hold (a check constraint).
    let bad = checkout_of("TEE", 0);
    let js = app.jetstream().await;
    for checkout in good.iter().take(2).chain([&bad]).chain(good.iter().skip(2)) {
        let out = Outgoing::new(
            &Event::Requested {
                checkout: checkout.clone(),
            },
            None,
        )
        .expect("encodes");
        app.bus_publish(&js, &out).await;
    }
    let _reserve = app.start_roles(&[Role::Reserve]).await;
    app.eventually("the good orders confirmed", || async {
        app.count("SELECT count(*) FROM orders.orders WHERE status = 'confirmed'")
            .await
            == 4
    })
    .await;
    app.eventually("the bad one dead-lettered", || async {
        app.dead_letters().await == 1
    })
    .await;
    assert_eq!(app.stock("TEE").await, (6, 0, 6));
    // Every good order was reserved exactly once.
    assert_eq!(
        app.count("SELECT count(*) FROM inventory.stock_movements WHERE kind = 'reserve'")
            .await,
        4
    );
    assert_eq!(
        app.count("SELECT count(*) FROM inventory.inbox WHERE consumer = 'reserve'")
            .await,
        4
    );
}
