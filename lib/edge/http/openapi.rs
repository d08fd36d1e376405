//! The OpenAPI 3.1 document of the edge, generated from the handlers' annotations and served
//! at `GET /openapi.json`. Every `/api` operation may also answer the common errors, all with
//! the same body: `{"error": {"code": "snake_case", "message": "..."}}`.

use axum::Json;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ContentBuilder, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

use super::{actions, admin, carts, checkout, orders, timeline, views, webhooks};

/// The error body of every 4xx and 5xx.
#[derive(serde::Serialize, ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

/// What went wrong.
#[derive(serde::Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable snake_case code, e.g. `out_of_stock`.
    code: String,
    message: String,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "checkout",
        description = "A resilient e-commerce checkout: carts, promotions, pricing with tax and shipping, checkout, orders. Money is a decimal string. Checkout is asynchronous: 202 with an order id, then follow the order.",
    ),
    paths(
        carts::get_cart,
        carts::add_item,
        carts::set_item,
        carts::remove_item,
        carts::apply_promo,
        carts::remove_promo,
        carts::quote,
        checkout::checkout,
        orders::get_order,
        actions::ship,
        actions::ship_part,
        actions::cancel,
        actions::refund,
        actions::refund_part,
        timeline::events,
        admin::put_product,
        admin::put_stock,
        admin::get_stock,
        admin::put_promo,
        admin::put_tax_rates,
        admin::put_shipping_rates,
        admin::create_webhook,
        admin::list_webhooks,
        admin::get_webhook,
        admin::delete_webhook,
        admin::rotate_webhook,
        admin::enable_webhook,
        admin::disable_webhook,
        admin::webhook_deliveries,
        admin::replay_webhook,
        webhooks::provider_webhook,
    ),
    components(schemas(ErrorBody, ErrorDetail, views::CartJson)),
    modifiers(&Security, &CommonErrors, &Links),
    tags(
        (name = "cart", description = "The caller's open cart"),
        (name = "checkout", description = "Placing an order"),
        (name = "orders", description = "Orders, their timeline, shipments, cancels and refunds"),
        (name = "webhooks", description = "The payment provider's signed events"),
        (name = "admin", description = "Catalog, stock, promotions, tax and shipping rates, webhook endpoints (admin role)"),
    )
)]
pub struct ApiDoc;

/// Bearer JWTs.
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The errors any `/api` operation can answer, added to each operation that does not list
/// the status itself.
struct CommonErrors;

const COMMON: [(&str, &str); 10] = [
    ("400", "malformed request (invalid JSON, a missing or invalid Idempotency-Key)"),
    ("401", "missing or invalid bearer token"),
    ("403", "the caller lacks the admin role"),
    ("404", "no such resource (or not the caller's)"),
    ("409", "conflicts with the current state (out_of_stock, cart_already_checked_out, invalid_order_state, ...)"),
    ("413", "request body too large"),
    ("415", "the body is not application/json"),
    ("422", "the request is well-formed but invalid (the code says which field)"),
    ("429", "this user's rate limit; see Retry-After"),
    ("503", "overloaded or a dependency unavailable; see Retry-After"),
];

impl Modify for CommonErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                item.get.as_mut(),
                item.put.as_mut(),
                item.post.as_mut(),
                item.delete.as_mut(),
            ];
            for operation in operations.into_iter().flatten() {
                for (status, description) in COMMON {
                    operation
                        .responses
                        .responses
                        .entry(status.to_owned())
                        .or_insert_with(|| {
                            let mut response =
                                ResponseBuilder::new().description(description).content(
                                    "application/json",
                                    ContentBuilder::new()
                                        .schema(Some(RefOr::Ref(
                                            utoipa::openapi::Ref::from_schema_name("ErrorBody"),
                                        )))
                                        .build(),
                                );
                            if status == "429" || status == "503" {
                                response = response.header(
                                    "Retry-After",
                                    utoipa::openapi::header::Header::new(
                                        utoipa::openapi::ObjectBuilder::new()
                                            .schema_type(utoipa::openapi::schema::Type::Integer),
                                    ),
                                );
                            }
                            RefOr::T(response.build())
                        });
                }
            }
        }
    }
}

/// How the answers lead on, for clients and for schemathesis' stateful runs: a cart to its
/// checkout, a checkout to its order, timeline and cancellation.
struct Links;

impl Modify for Links {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use serde_json::json;
        use utoipa::openapi::link::LinkBuilder;
        let add = |openapi: &mut utoipa::openapi::OpenApi,
                   path: &str,
                   status: &str,
                   name: &str,
                   link: utoipa::openapi::link::Link| {
            let Some(item) = openapi.paths.paths.get_mut(path) else {
                return;
            };
            let Some(operation) = item.post.as_mut() else {
                return;
            };
            if let Some(RefOr::T(response)) = operation.responses.responses.get_mut(status) {
                response.links.insert(name.to_owned(), RefOr::T(link));
            }
        };
        let mut checkout = LinkBuilder::new()
            .operation_id("checkout")
            .parameter("header.Idempotency-Key", "$response.body#/cartId")
            .build();
        checkout.request_body = Some(json!({
            "cartId": "$response.body#/cartId",
            "paymentMethod": {"token": "tok_visa"},
            "address": {"name": "Ada Lovelace", "line1": "1 Analytical St", "city": "London",
                        "postalCode": "N1 9GU", "country": "GB"}
        }));
        add(openapi, "/api/cart/items", "200", "checkout", checkout);
        for (name, operation) in [
            ("order", "get_order"),
            ("timeline", "events"),
            ("cancel", "cancel"),
        ] {
            let link = LinkBuilder::new()
                .operation_id(operation)
                .parameter("order_id", "$response.body#/orderId")
                .build();
            add(openapi, "/api/checkout", "202", name, link);
        }
    }
}

/// The document as JSON. utoipa 5 writes link fields in snake case (`operation_id`); the
/// OpenAPI spec (and every client) wants `operationId`, so links are fixed up here.
pub fn json() -> serde_json::Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    let links = doc["paths"]
        .as_object_mut()
        .into_iter()
        .flat_map(|paths| paths.values_mut())
        .filter_map(|item| item.as_object_mut())
        .flat_map(|item| item.values_mut())
        .filter_map(|operation| operation.get_mut("responses"))
        .filter_map(|responses| responses.as_object_mut())
        .flat_map(|responses| responses.values_mut())
        .filter_map(|response| response.get_mut("links"))
        .filter_map(|links| links.as_object_mut())
        .flat_map(|links| links.values_mut())
        .filter_map(|link| link.as_object_mut());
    for link in links {
        for (snake, camel) in [
            ("operation_id", "operationId"),
            ("operation_ref", "operationRef"),
            ("request_body", "requestBody"),
        ] {
            if let Some(value) = link.remove(snake) {
                link.insert(camel.to_owned(), value);
            }
        }
    }
    doc
}

/// `GET /openapi.json`.
pub async fn document() -> Json<serde_json::Value> {
    Json(json())
}
