//! The 3-D Secure challenge: the page a `requires_action` authorization redirects the customer
//! to, where they approve or deny the payment.

use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Form;
use serde::Deserialize;

use crate::{Sandbox, Undecidable};

#[derive(Deserialize)]
pub(crate) struct ChallengeForm {
    outcome: String,
}

/// `GET /challenge/{auth_id}`: what is being paid, and the two buttons.
pub(crate) async fn page(State(sandbox): State<Sandbox>, Path(id): Path<String>) -> Response {
    let auth = match sandbox.authorization(&id) {
        Ok(Some(auth)) => auth,
        Ok(None) => return not_found(),
        Err(_) => return broken(),
    };
    let summary = format!(
        "<p>Amount: <strong>{} {}</strong></p>\n<p>Reference: <code>{}</code></p>\n",
        escape(&auth.amount_text),
        escape(&auth.currency),
        escape(&auth.reference),
    );
    let action = if auth.status == "requires_action" {
        format!(
            "<form method=\"post\" action=\"/challenge/{}\">\n\
             <button type=\"submit\" name=\"outcome\" value=\"approve\">Approve</button>\n\
             <button type=\"submit\" name=\"outcome\" value=\"deny\">Deny</button>\n\
             </form>\n",
            escape(&id)
        )
    } else {
        format!("<p>This payment is already {}.</p>\n", auth.status)
    };
    html(
        StatusCode::OK,
        "Confirm this payment",
        &format!("{summary}{action}"),
    )
}

/// `POST /challenge/{auth_id}` with `outcome=approve` or `outcome=deny`.
pub(crate) async fn answer(
    State(sandbox): State<Sandbox>,
    Path(id): Path<String>,
    form: Result<Form<ChallengeForm>, FormRejection>,
) -> Response {
    match sandbox.authorization(&id) {
        Ok(Some(_)) => {}
        Ok(None) => return not_found(),
        Err(_) => return broken(),
    }
    let approve = match form.as_ref().map(|Form(f)| f.outcome.as_str()) {
        Ok("approve") => true,
        Ok("deny") => false,
        _ => {
            return html(
                StatusCode::BAD_REQUEST,
                "Bad answer",
                "<p>The outcome must be <code>approve</code> or <code>deny</code>.</p>\n",
            )
        }
    };
    match sandbox.decide(&id, "requires_action", approve) {
        Ok(Some(return_url)) => Redirect::to(&return_url).into_response(),
        Ok(None) => {
            let outcome = if approve { "approved" } else { "denied" };
            html(
                StatusCode::OK,
                "Done",
                &format!("<p>Payment {outcome}. You can close this page.</p>\n"),
            )
        }
        Err(Undecidable::Decided(status)) => html(
            StatusCode::CONFLICT,
            "Already answered",
            &format!("<p>This payment is already {status}: nothing was changed.</p>\n"),
        ),
        Err(Undecidable::NotFound) => not_found(),
        Err(Undecidable::Poisoned) => broken(),
    }
}

fn not_found() -> Response {
    html(
        StatusCode::NOT_FOUND,
        "Not found",
        "<p>No such payment.</p>\n",
    )
}

fn broken() -> Response {
    html(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Error",
        "<p>The sandbox's ledger is broken.</p>\n",
    )
}

fn html(status: StatusCode, title: &str, body: &str) -> Response {
    let page = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Sandbox PSP: {title}</title>\
         </head>\n<body>\n<h1>{title}</h1>\n{body}</body></html>\n"
    );
    (status, Html(page)).into_response()
}

/// Text as HTML (the reference and the amount are whatever the merchant sent).
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            _ => escaped.push(c),
        }
    }
    escaped
}
