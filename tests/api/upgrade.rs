//! Upgrading from the saga whose stock was committed by a step of its own (`inventory-commit`,
//! which emitted `checkout.committed`): the order step now commits the stock itself, and what
//! the old step left behind must neither take the units twice nor unwind a confirmed order.
//! And from the edge that shipped orders whole: its request without a part still ships the
//! order, as one shipment of everything, so the order's parts equal its payments ledger.

use checkout::app::Role;
use checkout::saga::events::Event;
use checkout::saga::Outgoing;

use crate::helpers::TestApp;

#[tokio::test]
async fn stock_the_old_step_committed_leaves_once_and_its_committed_event_changes_nothing() {
    // No order role yet: the checkout stops at `authorized`, where the old commit step took it.
    let roles = [Role::Edge, Role::Reserve, Role::Authorize, Role::Compensate];
    let app = TestApp::spawn_roles(&roles, |_| {}).await;
    app.product("TEE", "10.00", 10).await;
    let (token, id) = app.buy("alice", "TEE", "tok_visa").await;
    app.eventually("the payment authorized", || async {
        app.count("SELECT count(*) FROM payments.payments WHERE status = 'authorized'")
            .await
            == 1
    })
    .await;
    assert_eq!(app.stock("TEE").await, (10, 1, 9));

    // What the old step did before the upgrade: the hold committed, the unit out of stock.
    let order_id: uuid::Uuid = id.parse().expect("uuid");
    let mut tx = app.pool.begin().await.expect("tx");
    for sql in [
        "UPDATE inventory.inventory_reservations SET status = 'committed' WHERE order_id = $1",
        "UPDATE inventory.stock SET on_hand = on_hand - 1, reserved = reserved - 1 WHERE sku = 'TEE'",
        "INSERT INTO inventory.stock_movements (sku, kind, order_id, on_hand_delta, reserved_delta)
         VALUES ('TEE', 'commit', $1, -1, -1)",
    ] {
        sqlx::query(sql)
            .bind(order_id)
            .execute(&mut *tx)
            .await
            .expect("old commit step");
    }
    tx.commit().await.expect("commit");

    // The new order role is handed the `authorized` event: it confirms without a second take.
    let _order = app.start_roles(&[Role::Order]).await;
    let order = app.settled(&token, &id).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(app.stock("TEE").await, (9, 0, 9));

    // The old step's `committed` event, still in flight, arrives after the order exists.
    let js = app.jetstream().await;
    let stream = js.get_stream("CHECKOUT").await.expect("stream");
    let authorized = stream
        .get_last_raw_message_by_subject(&format!("checkout.authorized.{id}"))
        .await
        .expect("the authorized event");
    let Ok(Event::Authorized {
        checkout,
        payment_id,
        auth_id,
    }) = Event::decode(&authorized.payload)
    else {
        panic!("not an authorized event");
    };
    let committed = Event::Committed {
        checkout,
        payment_id,
        auth_id,
    };
    app.bus_publish(&js, &Outgoing::new(&committed, None).expect("encodes"))
        .await;
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer("order").await.expect("consumer");
    app.eventually("the committed event handled", || {
        let mut c = consumer.clone();
        async move {
            c.info()
                .await
                .is_ok_and(|i| i.num_pending == 0 && i.num_ack_pending == 0)
        }
    })
    .await;
    assert_eq!(
        consumer
            .info()
            .await
            .expect("info")
            .delivered
            .stream_sequence,
        stream
            .clone()
            .info()
            .await
            .expect("info")
            .state
            .last_sequence,
        "the order step took the committed event"
    );

    // Nothing was unwound: no rejection, the order confirmed, the unit sold once, the money held.
    let rejected = stream
        .get_last_raw_message_by_subject(&format!("checkout.rejected.{id}"))
        .await;
    assert!(rejected.is_err(), "a confirmed order was rejected");
    assert_eq!(app.order(&token, &id).await.1["status"], "confirmed");
    assert_eq!(app.stock("TEE").await, (9, 0, 9));
    assert_eq!(
        app.count("SELECT count(*) FROM payments.payments WHERE status = 'authorized'")
            .await,
        1
    );
    app.audit().await;
}

#[tokio::test]
async fn a_whole_order_ship_request_from_an_older_edge_ships_as_one_shipment_of_everything() {
    let app = TestApp::spawn().await;
    app.product("TEE", "10.00", 10).await;
    let (token, id) = app.buy("alice", "TEE", "tok_visa").await;
    let order = app.settled(&token, &id).await;
    assert_eq!(order["status"], "confirmed", "{order}");

    // An edge from before shipments in parts: the lock taken, the request without a part.
    let order_id: uuid::Uuid = id.parse().expect("uuid");
    sqlx::query(
        "UPDATE orders.orders SET pending_action = 'ship', action_attempt = action_attempt + 1
         WHERE order_id = $1",
    )
    .bind(order_id)
    .execute(&app.pool)
    .await
    .expect("the old edge's lock");
    let js = app.jetstream().await;
    let stream = js.get_stream("CHECKOUT").await.expect("stream");
    let confirmed = stream
        .get_last_raw_message_by_subject(&format!("checkout.confirmed.{id}"))
        .await
        .expect("the confirmed event");
    let Ok(Event::Confirmed { checkout }) = Event::decode(&confirmed.payload) else {
        panic!("not a confirmed event");
    };
    let total = checkout.total;
    let request = Event::ShipRequested {
        checkout,
        attempt: 1,
        part: None,
    };
    app.bus_publish(&js, &Outgoing::new(&request, None).expect("encodes"))
        .await;

    app.eventually("shipped", || async {
        app.order(&token, &id).await.1["status"] == "shipped"
    })
    .await;
    let (_, order) = app.order(&token, &id).await;
    let shipments = order["shipments"].as_array().cloned().unwrap_or_default();
    assert_eq!(shipments.len(), 1, "{order}");
    assert_eq!(shipments[0]["status"], "shipped");
    assert_eq!(shipments[0]["amount"], order["total"]);
    assert_eq!(order["money"]["captured"], order["total"], "{order}");
    assert_eq!(app.ledger_count(&id, "capture").await, 1);
    assert_eq!(order["total"], format!("{total:.2}"));
    app.audit().await;
}
