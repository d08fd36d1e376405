//! Batch-native steps: one bad message in a batch does not fail its neighbours, a message
//! the database refuses is dead-lettered (alone or in a batch), and the inbox keeps a batch
//! idempotent.

use checkout::app::Role;
use checkout::domain::{Address, Currency, Quantity, Sku};
use checkout::saga::events::{Checkout, Event, Line};
use checkout::saga::Outgoing;
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::helpers::TestApp;

fn checkout_of(sku: &str, qty: i64) -> Checkout {
    let price = Decimal::new(1000, 2);
    Checkout {
        order_id: Uuid::now_v7(),
        user_id: "batcher".into(),
        cart_id: Uuid::new_v4(),
        items: vec![Line {
            sku: Sku::parse(sku).expect("sku"),
            qty: Quantity::new(qty).expect("qty"),
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
        currency: Currency::parse("USD").expect("currency"),
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
        return_url: None,
    }
}

#[tokio::test]
async fn one_bad_message_in_a_batch_does_not_fail_its_neighbours() {
    // No reserve role yet: the requests queue up and are pulled together as one batch.
    let roles = [Role::Edge, Role::Authorize, Role::Order, Role::Compensate];
    let app = TestApp::spawn_roles(&roles, |_| {}).await;
    app.product("TEE", "10.00", 10).await;
    let good: Vec<Checkout> = (0..4).map(|_| checkout_of("TEE", 1)).collect();
    let js = app.jetstream().await;
    let requested = |checkout: &Checkout| {
        Outgoing::new(
            &Event::Requested {
                checkout: checkout.clone(),
            },
            None,
        )
        .expect("encodes")
    };
    // A line of zero units, as a buggy producer would send it: valid msgpack, refused when
    // decoded (a quantity is 1 to 1000), so the schema stops it before any write.
    let mut bad = requested(&checkout_of("TEE", 1));
    let qty_one: &[u8] = b"\xa3qty\x01";
    let at = bad
        .payload
        .windows(qty_one.len())
        .position(|w| w == qty_one)
        .expect("the encoded line has qty 1");
    bad.payload[at + qty_one.len() - 1] = 0;
    for out in good
        .iter()
        .take(2)
        .map(requested)
        .chain([bad])
        .chain(good.iter().skip(2).map(requested))
    {
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

/// A committed checkout for the order step whose buyer id PostgreSQL cannot store (a NUL in
/// text): it decodes, so only the order's insert refuses it.
fn committed(checkout: Checkout) -> Outgoing {
    Outgoing::new(
        &Event::Committed {
            checkout,
            payment_id: Uuid::now_v7(),
            auth_id: "auth_test".into(),
        },
        None,
    )
    .expect("encodes")
}

#[tokio::test]
async fn a_message_the_database_refuses_is_dead_lettered_alone_or_in_a_batch() {
    // No order role yet: the committed events queue up and are pulled as one batch.
    let roles = [Role::Edge, Role::Compensate];
    let app = TestApp::spawn_roles(&roles, |_| {}).await;
    let js = app.jetstream().await;
    let good: Vec<Checkout> = (0..3).map(|_| checkout_of("TEE", 1)).collect();
    let mut bad = checkout_of("TEE", 1);
    bad.user_id = "nul\u{0}byte".into();
    for out in [
        committed(good[0].clone()),
        committed(bad),
        committed(good[1].clone()),
    ] {
        app.bus_publish(&js, &out).await;
    }
    let _order = app.start_roles(&[Role::Order]).await;
    app.eventually("the batch's good orders confirmed", || async {
        app.count("SELECT count(*) FROM orders.orders WHERE status = 'confirmed'")
            .await
            == 2
    })
    .await;
    app.eventually("the refused one dead-lettered", || async {
        app.dead_letters().await == 1
    })
    .await;

    // Alone (a batch of one), the same refusal must dead-letter too, not loop.
    let mut lone = checkout_of("TEE", 1);
    lone.user_id = "another\u{0}nul".into();
    app.bus_publish(&js, &committed(lone)).await;
    app.eventually("the lone refused one dead-lettered", || async {
        app.dead_letters().await == 2
    })
    .await;
    app.bus_publish(&js, &committed(good[2].clone())).await;
    app.eventually("the next good one confirmed", || async {
        app.count("SELECT count(*) FROM orders.orders WHERE status = 'confirmed'")
            .await
            == 3
    })
    .await;
    let stream = js.get_stream("CHECKOUT").await.expect("stream");
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer("order").await.expect("consumer");
    // The order row commits before its message is acked: wait for the ack.
    app.eventually("every message acked", || {
        let mut c = consumer.clone();
        async move { c.info().await.is_ok_and(|i| i.num_ack_pending == 0) }
    })
    .await;
    let info = consumer.info().await.expect("info");
    assert_eq!(
        info.num_redelivered, 0,
        "no refused message was redelivered"
    );
    assert_eq!(app.dead_letters().await, 2);
}

#[tokio::test]
async fn a_replayed_event_is_recognised_by_the_inbox_and_not_applied_again() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 10).await;
    let js = app.jetstream().await;
    let requested = Outgoing::new(
        &Event::Requested {
            checkout: checkout_of("TEE", 2),
        },
        None,
    )
    .expect("encodes");
    app.bus_publish(&js, &requested).await;
    app.eventually("the order confirmed and its stock committed", || async {
        app.count("SELECT count(*) FROM orders.orders WHERE status = 'confirmed'")
            .await
            == 1
            && app.stock("TEE").await == (8, 0, 8)
    })
    .await;
    // The same event as a new stream message (another Nats-Msg-Id), as a replay with the
    // `nats` CLI or a republish after the dedup window makes it: a first delivery of an event
    // the reserve step handled. The batch skips the inbox look-up for first deliveries, so
    // the inbox's insert has to catch it.
    let before = app.deliveries("reserve").await;
    let seq = app
        .replay_last(&format!("checkout.requested.{}", requested.order_id))
        .await;
    app.until_acked("reserve", seq).await;
    // Handled on its first delivery: the failed attempt without the look-up was redone with
    // it at once, not handed back to the server for a redelivery.
    assert_eq!(app.deliveries("reserve").await, before + 1);
    // Reserved once: no second hold, no second movement, one inbox row.
    assert_eq!(app.stock("TEE").await, (8, 0, 8));
    assert_eq!(
        app.count("SELECT count(*) FROM inventory.stock_movements WHERE kind = 'reserve'")
            .await,
        1
    );
    assert_eq!(
        app.count("SELECT count(*) FROM inventory.inbox WHERE consumer = 'reserve'")
            .await,
        1
    );
    assert_eq!(app.dead_letters().await, 0);
}
