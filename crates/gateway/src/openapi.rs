//! The OpenAPI 3.1 document of the HTTP API, served at [`PATH`] and checked in as
//! `docs/openapi.json`.
//!
//! It is built from the code's own tables — the result codes with their statuses
//! and messages, the header names, the identifiers' lengths, the time zones, the
//! body's limits, the response bodies as `error::body_json` writes them — so it
//! cannot promise what the gateway does not do. A unit test keeps the checked-in
//! copy equal to [`document`]; `UPDATE_OPENAPI=1` rewrites it.

use crate::auth::{ACCESS_KEY, ASP_ID, CORRELATION_ID, CRYPTO_KEY_ID, TIME_ZONE, TRAN_TIME, TRAN_TOKEN};
use crate::crypto::TokenInput;
use crate::error::body_json;
use crate::{STATUS_TOKEN_PARAM, TRANSFER_PATH};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cardflow_domain::request::{status_token, STATUS_TOKEN_LEN};
use cardflow_domain::time_zone::SUPPORTED;
use cardflow_domain::{AccessKey, AspId, CardNo, CorrelationId, CryptoKeyId, Money, ResultCode, TranToken, UserId};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::LazyLock;

pub const PATH: &str = "/api/v1/openapi.json";

/// `GET /api/v1/openapi.json`. No authentication: the document holds nothing that
/// credentials protect, and a client generator has none before reading it.
pub async fn serve() -> Response {
    static TEXT: LazyLock<String> = LazyLock::new(|| document().to_string());
    ([(CONTENT_TYPE, "application/json")], TEXT.as_str()).into_response()
}

/// The characters `ids.rs` allows in an AspId, an access key and a crypto key id, as
/// a regular-expression class; a test holds it to the parsers.
const ID_CHARS: &str = "A-Za-z0-9_-";

/// The README's test vector: a request signed with the demo signing secret, so a
/// client author can check an implementation against the examples.
const EXAMPLE_BODY: &str =
    r#"{"userId":1001,"fromCardNo":"9410000000000001","toCardNo":"9410000000000002","amount":30000}"#;
const EXAMPLE_TOKEN: &str = include_str!("../../../docs/vectors/token.txt");
const EXAMPLE_ENC_DATA: &str = include_str!("../../../docs/vectors/encdata.txt");

/// The two operations of the API. Each answers a code of the table only where its
/// handler can produce it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Operation {
    Transfer,
    Status,
}

impl Operation {
    fn answers(self, code: ResultCode) -> bool {
        if is_routers(code) {
            return false;
        }
        match self {
            // 000_012 is the status query's own: "No request with this correlation id."
            Operation::Transfer => code != ResultCode::NotFound,
            // The status query sends no body, so nothing to decrypt or to parse;
            // `000_008` is its answer when the id was decided for another body than
            // the one its `request` names.
            Operation::Status => !matches!(code, ResultCode::DecryptionFailed | ResultCode::MalformedBody),
        }
    }
}

/// The codes the router answers before any operation runs (a path or a method the
/// gateway does not serve): described in the document's info, not per operation.
fn is_routers(code: ResultCode) -> bool {
    matches!(code, ResultCode::NoSuchEndpoint | ResultCode::MethodNotAllowed)
}

/// The answers that tell a client when to come back: a pending result
/// (`Answer::pending`), the rate limit (`within_rate`) and `ApiError::unavailable`.
fn sends_retry_after(code: ResultCode) -> bool {
    matches!(code, ResultCode::Pending | ResultCode::TooManyRequests | ResultCode::ServiceUnavailable)
}

/// The document, built anew on each call.
pub fn document() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "cardflow",
            "version": env!("CARGO_PKG_VERSION"),
            "license": {"name": env!("CARGO_PKG_LICENSE"), "identifier": env!("CARGO_PKG_LICENSE")},
            "description": info_description(),
        },
        "tags": [
            {"name": "transfer", "description": "Moving balance between the cards of one member."},
            {"name": "operations", "description": "Probes and metrics, without authentication."},
        ],
        "paths": {
            TRANSFER_PATH: {"post": transfer_operation()},
            status_path(): {"get": status_operation()},
            PATH: {"get": {
                "tags": ["operations"],
                "operationId": "openApiDocument",
                "summary": "This document",
                "responses": {"200": {
                    "description": "The OpenAPI document of the API.",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }},
            }},
            "/healthz": {"get": plain_text_probe("livenessProbe", "Liveness", "`ok` while the process serves HTTP.", None)},
            "/readyz": {"get": plain_text_probe(
                "readinessProbe",
                "Readiness",
                "`ready`: Postgres answers, the reply consumer is assigned its partition and the broker answers.",
                Some("Not ready; the body names the reason."),
            )},
            "/metrics": {"get": {
                "tags": ["operations"],
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "responses": {"200": {
                    "description": "The metrics in the Prometheus text format.",
                    "content": {"text/plain; version=0.0.4": {"schema": {"type": "string"}}},
                }},
            }},
        },
        "components": components(),
        "x-result-codes": ResultCode::ALL
            .iter()
            .map(|c| json!({"code": c.code(), "httpStatus": c.http_status(), "message": c.message()}))
            .collect::<Vec<_>>(),
    })
}

fn status_path() -> String {
    format!("{TRANSFER_PATH}/{{correlationId}}")
}

fn info_description() -> String {
    format!(
        "The card-balance transfer API. Every answer is one row of the result-code table \
         (`x-result-codes`): the body is `{{\"code\", \"message\"}}`, with `amount` on success, and the \
         HTTP status comes from the table. A path the gateway does not serve is `{no_such_endpoint}` \
         (404), and a method its path does not take `{method_not_allowed}` (405, with `Allow`).\n\n\
         Requests are signed: `{TRAN_TOKEN}` is `v1` followed by the lowercase hex HMAC-SHA256, keyed with \
         the access key's signing secret, over `{canonical}`, the raw body being the bytes as sent (the \
         encrypted envelope, when encrypted). `{TRAN_TIME}`, read in `{TIME_ZONE}`, must lie within the \
         server's allowed window, else `{window}`. With `{CRYPTO_KEY_ID}` the body is \
         `{{\"encData\": ...}}` (AES-256-GCM with that data key) and so is the answer.\n\n\
         The examples are the README's test vector, signed with the demo signing secret \
         `demo-signing-secret-change-me`.",
        canonical = token_formula(),
        window = ResultCode::RequestTimeOutOfWindow.code(),
        no_such_endpoint = ResultCode::NoSuchEndpoint.code(),
        method_not_allowed = ResultCode::MethodNotAllowed.code(),
    )
}

/// What the token signs, in the order `TokenInput::canonical` writes it.
fn token_formula() -> String {
    let names = TokenInput {
        method: "METHOD",
        path: "PATH",
        asp_id: "AspId",
        correlation_id: "CorrelationId",
        tran_time: "TranTime",
        time_zone: "TimeZone",
        body: b"",
    }
    .canonical();
    // The last line is the body's digest, which has no name to show.
    let (fields, _) = names.rsplit_once('\n').expect("the canonical text ends with the body's digest");
    format!("{fields}\nhex(SHA-256(raw body))").replace('\n', " \\n ")
}

fn plain_text_probe(id: &str, summary: &str, ok: &str, unavailable: Option<&str>) -> Value {
    let text = json!({"text/plain": {"schema": {"type": "string"}}});
    let mut responses = json!({"200": {"description": ok, "content": text}});
    if let Some(why) = unavailable {
        responses["503"] = json!({"description": why, "content": text});
    }
    json!({"tags": ["operations"], "operationId": id, "summary": summary, "responses": responses})
}

fn parameter_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/parameters/{name}")})
}

const SIGNED_HEADERS: [&str; 7] = [ASP_ID, CORRELATION_ID, ACCESS_KEY, CRYPTO_KEY_ID, TRAN_TOKEN, TRAN_TIME, TIME_ZONE];

fn transfer_operation() -> Value {
    let mut parameters: Vec<Value> = SIGNED_HEADERS.iter().map(|h| parameter_ref(h)).collect();
    parameters.push(parameter_ref("Prefer"));
    json!({
        "tags": ["transfer"],
        "operationId": "transferBalance",
        "summary": "Transfer card balance",
        "description": format!(
            "Moves `amount` from `fromCardNo` to `toCardNo`, both registered to member `userId`; a null or 0 \
             `amount` moves the whole balance. The answer's `amount` is what moved.\n\n\
             The gateway waits for the result up to its reply deadline; past it, or at once with \
             `Prefer: respond-async`, it answers 202 `{pending}` with a `Location` to poll.\n\n\
             `({ASP_ID}, {CORRELATION_ID})` names a request forever: the same request again gets the first \
             answer and moves no money; another body under a used id is `{reused}`. While another body is \
             still pending under the id, a request waits for its own answer, also with `respond-async`, and \
             past the deadline answers `{unavailable}` instead of 202. A client that does not know what \
             became of a request sends it again under the same correlation id.",
            pending = ResultCode::Pending.code(),
            reused = ResultCode::CorrelationIdReused.code(),
            unavailable = ResultCode::ServiceUnavailable.code(),
        ),
        "parameters": parameters,
        "requestBody": {
            "required": true,
            "description": format!("The transfer, or with `{CRYPTO_KEY_ID}` the same JSON encrypted."),
            "content": {"application/json": {
                "schema": {"oneOf": [schema_ref("TransferRequest"), schema_ref("EncryptedBody")]},
                "examples": {
                    "plain": {
                        "summary": "A transfer of 30000",
                        "value": serde_json::from_str::<Value>(EXAMPLE_BODY).expect("the example body is JSON"),
                    },
                    "encrypted": {
                        "summary": format!("The same, encrypted with the demo data key (with `{CRYPTO_KEY_ID}`)"),
                        "value": {"encData": EXAMPLE_ENC_DATA.trim()},
                    },
                },
            }},
        },
        "responses": responses(Operation::Transfer),
    })
}

fn status_operation() -> Value {
    let mut parameters = vec![parameter_ref("correlationId"), parameter_ref(STATUS_TOKEN_PARAM)];
    parameters.extend(SIGNED_HEADERS.iter().map(|h| parameter_ref(h)));
    json!({
        "tags": ["transfer"],
        "operationId": "transferStatus",
        "summary": "The result of a transfer",
        "description": format!(
            "Signed like the transfer, over an empty body and this path without its query. Answers the final \
             result exactly as the transfer would have (same status, body and encryption), 202 `{pending}` while \
             it is pending, and 404 `{not_found}` when the caller's ASP sent no request under this correlation \
             id (or it is not recorded yet: send the transfer again under the same id). Call it as the 202's \
             `Location` gives it, with `request`: then it answers for that body, and `{reused}` once the id was \
             decided for another body.",
            pending = ResultCode::Pending.code(),
            not_found = ResultCode::NotFound.code(),
            reused = ResultCode::CorrelationIdReused.code(),
        ),
        "parameters": parameters,
        "responses": responses(Operation::Status),
    })
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn header_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/headers/{name}")})
}

/// One response per HTTP status the operation can answer, listing its codes.
fn responses(op: Operation) -> Value {
    let mut by_status: BTreeMap<u16, Vec<ResultCode>> = BTreeMap::new();
    for code in ResultCode::ALL.into_iter().filter(|c| op.answers(*c)) {
        by_status.entry(code.http_status()).or_default().push(code);
    }
    let mut out = Map::new();
    for (status, codes) in by_status {
        let reason = StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
        let listed: Vec<String> = codes.iter().map(|c| format!("- `{}` {}", c.code(), c.message())).collect();
        let mut headers = Map::new();
        headers.insert(CORRELATION_ID.into(), header_ref(CORRELATION_ID));
        headers.insert(CRYPTO_KEY_ID.into(), header_ref(CRYPTO_KEY_ID));
        if codes.contains(&ResultCode::Pending) {
            headers.insert("Location".into(), header_ref("Location"));
        }
        if codes.iter().any(|c| sends_retry_after(*c)) {
            headers.insert("Retry-After".into(), header_ref("Retry-After"));
        }
        let mut examples = Map::new();
        for code in &codes {
            examples.insert(code.code().into(), json!({"summary": code.message(), "value": example_answer(*code)}));
        }
        out.insert(
            status.to_string(),
            json!({
                "description": format!("{reason}\n\n{}", listed.join("\n")),
                "headers": headers,
                "content": {"application/json": {
                    "schema": {"oneOf": [schema_ref("Result"), schema_ref("EncryptedBody")]},
                    "examples": examples,
                }},
            }),
        );
    }
    Value::Object(out)
}

/// The body the gateway sends for `code`, written by the code that writes answers.
fn example_answer(code: ResultCode) -> Value {
    let moved = code.is_success().then(|| {
        let request: Value = serde_json::from_str(EXAMPLE_BODY).expect("the example body is JSON");
        request["amount"].to_string().parse::<rust_decimal::Decimal>().expect("the example amount is a number")
    });
    serde_json::from_str(&body_json(code, code.message(), moved)).expect("answers are JSON")
}

fn exact_string(len: usize, pattern: String) -> Value {
    json!({"type": "string", "minLength": len, "maxLength": len, "pattern": pattern})
}

fn id_string(len: usize) -> Value {
    exact_string(len, format!("^[{ID_CHARS}]{{{len}}}$"))
}

fn correlation_id_schema() -> Value {
    // `yyMMddHHmiSS`, a dash, then hex digits to the full length.
    let hex = CorrelationId::LEN - 13;
    exact_string(CorrelationId::LEN, format!("^[0-9]{{12}}-[0-9A-Fa-f]{{{hex}}}$"))
}

fn card_no_schema(description: &str) -> Value {
    let mut s = exact_string(CardNo::LEN, format!("^[0-9]{{{}}}$", CardNo::LEN));
    s["description"] = description.into();
    s
}

fn header_parameter(name: &str, required: bool, description: String, schema: Value, example: &str) -> Value {
    json!({
        "name": name,
        "in": "header",
        "required": required,
        "description": description,
        "schema": schema,
        "example": example,
    })
}

fn components() -> Value {
    let invalid = ResultCode::InvalidValue.code();
    let missing = ResultCode::MissingRequiredValue.code();
    let zones: Vec<&str> = SUPPORTED.iter().map(|(name, _)| *name).collect();
    let token_mac = TranToken::LEN - 2;
    let parameters = json!({
        ASP_ID: header_parameter(
            ASP_ID,
            true,
            format!("The service provider (ASP), {} characters.", AspId::LEN),
            id_string(AspId::LEN),
            "DEMOASP00000001",
        ),
        CORRELATION_ID: header_parameter(
            CORRELATION_ID,
            true,
            "`yyMMddHHmiSS-xxxxxxx`: a real date and time, a dash and hex digits. With the AspId it names the \
             request forever."
                .to_string(),
            correlation_id_schema(),
            "261124153000-00000a1",
        ),
        ACCESS_KEY: header_parameter(
            ACCESS_KEY,
            true,
            format!("An active, unexpired access key of the ASP, {} characters.", AccessKey::LEN),
            id_string(AccessKey::LEN),
            "DEMOACCESSKEY000000000000000000000000001",
        ),
        CRYPTO_KEY_ID: header_parameter(
            CRYPTO_KEY_ID,
            false,
            format!(
                "A data key of the ASP, {} characters. When sent, a request body is `{{\"encData\": ...}}` \
                 and the answer is encrypted the same way.",
                CryptoKeyId::LEN
            ),
            id_string(CryptoKeyId::LEN),
            "DEMOCRYPTOKEY0000000000000000001",
        ),
        TRAN_TOKEN: header_parameter(
            TRAN_TOKEN,
            true,
            format!("`v1` and the lowercase hex HMAC-SHA256 over `{}`.", token_formula()),
            exact_string(TranToken::LEN, format!("^v1[0-9a-f]{{{token_mac}}}$")),
            EXAMPLE_TOKEN.trim(),
        ),
        TRAN_TIME: header_parameter(
            TRAN_TIME,
            true,
            format!("The client's clock, `YYYYMMDDHH24MISS` (14 digits, a real date and time) in `{TIME_ZONE}`."),
            exact_string(14, "^[0-9]{14}$".to_string()),
            "20261124153000",
        ),
        TIME_ZONE: header_parameter(
            TIME_ZONE,
            true,
            format!("The zone `{TRAN_TIME}` is written in; fixed offsets only."),
            json!({"type": "string", "enum": zones}),
            "KST",
        ),
        "Prefer": {
            "name": "Prefer",
            "in": "header",
            "required": false,
            "description": format!(
                "`respond-async` asks for the 202 `{}` as soon as Kafka has acknowledged the command.",
                ResultCode::Pending.code()
            ),
            "schema": {"type": "string"},
            "example": "respond-async",
        },
        "correlationId": {
            "name": "correlationId",
            "in": "path",
            "required": true,
            "description": format!("The `{CORRELATION_ID}` the transfer was sent with."),
            "schema": correlation_id_schema(),
            "example": "261124153000-00000a1",
        },
        STATUS_TOKEN_PARAM: {
            "name": STATUS_TOKEN_PARAM,
            "in": "query",
            "required": false,
            "description": format!(
                "The body the status is asked for, as the 202's `Location` names it. Without it the answer is \
                 the id's, whichever body was decided under it. Not in the signed path. A value of another form \
                 is `{}`.",
                ResultCode::InvalidValue.code()
            ),
            "schema": {"type": "string", "pattern": format!("^[0-9a-f]{{{STATUS_TOKEN_LEN}}}$")},
            "example": status_token(&"0".repeat(64)),
        },
    });
    let pending_status = example_answer(ResultCode::Pending)["status"].clone();
    let codes: Vec<&str> = {
        let mut seen = Vec::new();
        for c in ResultCode::ALL {
            if !seen.contains(&c.code()) {
                seen.push(c.code());
            }
        }
        seen
    };
    let schemas = json!({
        "TransferRequest": {
            "type": "object",
            "description": format!(
                "Every key is required; only `amount` may be null. An absent key, or a null one other than \
                 `amount`, is `{missing}` naming it; a value of the wrong type, length, format or range is \
                 `{invalid}`. Unknown fields are ignored; a field given twice is `{malformed}`.",
                malformed = ResultCode::MalformedBody.code(),
            ),
            "required": ["userId", "fromCardNo", "toCardNo", "amount"],
            "properties": {
                "userId": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": UserId::MAX,
                    "description": "The member both cards are registered to. Larger than a signed 64-bit \
                                    integer holds: read and write it as unsigned 64-bit or decimal, never as \
                                    a float.",
                },
                "fromCardNo": card_no_schema("The card the balance leaves."),
                "toCardNo": card_no_schema("The card the balance goes to."),
                "amount": {
                    "type": ["integer", "null"],
                    "minimum": 0,
                    "maximum": Money::MAX_REQUEST_AMOUNT,
                    "description": "The amount to move; null or 0 moves the whole balance.",
                },
            },
        },
        "EncryptedBody": {
            "type": "object",
            "description": format!(
                "An encrypted body: the request when `{CRYPTO_KEY_ID}` is sent, and then the answer too."
            ),
            "required": ["encData"],
            "additionalProperties": false,
            "properties": {"encData": {
                "type": "string",
                "contentEncoding": "base64",
                "description": "base64 of a 12-byte nonce, the ciphertext and the 16-byte tag: AES-256-GCM \
                                with the data key, over the plain JSON.",
            }},
        },
        "Result": {
            "type": "object",
            "description": "Every answer of the API (see `x-result-codes`).",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "enum": codes},
                "message": {
                    "type": "string",
                    "description": format!(
                        "The code's message; where a field or header is at fault, followed by a space and its \
                         name, e.g. `{}`.",
                        ResultCode::MissingRequiredValue.message_with(Some("toCardNo"))
                    ),
                },
                "amount": {
                    "type": "integer",
                    "minimum": 0,
                    "description": format!("With `{}` only: the amount moved.", ResultCode::Success.code()),
                },
                "status": {
                    "const": pending_status,
                    "description": format!("With `{}` only.", ResultCode::Pending.code()),
                },
            },
        },
    });
    let headers = json!({
        CORRELATION_ID: {
            "description": "The request's correlation id, echoed as sent.",
            "schema": {"type": "string"},
        },
        CRYPTO_KEY_ID: {
            "description": "With an encrypted answer: the data key it is encrypted with.",
            "schema": id_string(CryptoKeyId::LEN),
        },
        "Location": {
            "description": format!(
                "Where the result will be: `{}?{STATUS_TOKEN_PARAM}={{token}}`, the token naming this body.",
                status_path()
            ),
            "schema": {"type": "string", "format": "uri-reference"},
        },
        "Retry-After": {
            "description": "Seconds to wait before asking again.",
            "schema": {"type": "integer", "minimum": 0},
        },
    });
    json!({"parameters": parameters, "schemas": schemas, "headers": headers})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::parse_headers;
    use axum::http::{HeaderMap, HeaderName, HeaderValue};
    use cardflow_domain::TransferRequest;
    use std::collections::BTreeSet;

    const CHECKED_IN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");

    /// Objects with their keys in order, so the text is the same whether or not
    /// some build enables serde_json's `preserve_order`.
    fn sorted(v: Value) -> Value {
        match v {
            Value::Object(m) => {
                let ordered: BTreeMap<String, Value> = m.into_iter().map(|(k, v)| (k, sorted(v))).collect();
                Value::Object(ordered.into_iter().collect())
            }
            Value::Array(a) => Value::Array(a.into_iter().map(sorted).collect()),
            other => other,
        }
    }

    fn rendered() -> String {
        serde_json::to_string_pretty(&sorted(document())).unwrap() + "\n"
    }

    fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
        match v["$ref"].as_str() {
            Some(r) => doc.pointer(r.trim_start_matches('#')).unwrap_or_else(|| panic!("dangling {r}")),
            None => v,
        }
    }

    #[test]
    fn the_checked_in_copy_is_the_document() {
        let want = rendered();
        if std::env::var("UPDATE_OPENAPI").as_deref() == Ok("1") {
            std::fs::write(CHECKED_IN, &want).unwrap();
            return;
        }
        let have = std::fs::read_to_string(CHECKED_IN).unwrap_or_default();
        assert!(
            have == want,
            "docs/openapi.json is not the document the code builds; \
             rewrite it with: UPDATE_OPENAPI=1 cargo test -p cardflow-gateway --lib openapi"
        );
    }

    #[test]
    fn the_document_is_openapi_3_1_json() {
        let parsed: Value = serde_json::from_str(&document().to_string()).unwrap();
        assert_eq!(parsed["openapi"], "3.1.0");
    }

    #[test]
    fn every_result_code_is_listed_with_its_status_and_message() {
        let doc = document();
        let listed = doc["x-result-codes"].as_array().unwrap();
        assert_eq!(listed.len(), ResultCode::ALL.len());
        for (row, code) in listed.iter().zip(ResultCode::ALL) {
            assert_eq!(row["code"], code.code());
            assert_eq!(row["httpStatus"], code.http_status());
            assert_eq!(row["message"], code.message());
        }
    }

    #[test]
    fn every_result_code_is_answered_under_its_status_by_some_operation() {
        let doc = document();
        for code in ResultCode::ALL.into_iter().filter(|c| !is_routers(*c)) {
            let line = format!("- `{}` {}", code.code(), code.message());
            let found = [&doc["paths"][TRANSFER_PATH]["post"], &doc["paths"][status_path()]["get"]].iter().any(|op| {
                op["responses"][code.http_status().to_string()]["description"]
                    .as_str()
                    .is_some_and(|d| d.lines().any(|l| l == line))
            });
            assert!(found, "{} ({}) is answered nowhere", code.code(), code.http_status());
        }
    }

    #[test]
    fn the_transfer_has_a_response_for_every_status_it_can_answer() {
        let doc = document();
        let responses = doc["paths"][TRANSFER_PATH]["post"]["responses"].as_object().unwrap();
        let documented: BTreeSet<u16> = responses.keys().map(|s| s.parse().unwrap()).collect();
        let statuses: BTreeSet<u16> = ResultCode::ALL
            .into_iter()
            .filter(|c| Operation::Transfer.answers(*c))
            .map(ResultCode::http_status)
            .collect();
        assert_eq!(documented, statuses);
        // Every status of the table but the status query's 404 and the router's 405.
        let all: BTreeSet<u16> = ResultCode::ALL.into_iter().map(ResultCode::http_status).collect();
        assert_eq!(all.difference(&documented).copied().collect::<Vec<_>>(), [404, 405]);
    }

    #[test]
    fn the_routers_own_answers_are_described_in_the_info() {
        let doc = document();
        let info = doc["info"]["description"].as_str().unwrap();
        for code in ResultCode::ALL.into_iter().filter(|c| is_routers(*c)) {
            assert!(info.contains(&format!("`{}` ({}", code.code(), code.http_status())), "{}", code.code());
        }
    }

    #[test]
    fn the_example_request_passes_the_gateways_own_parsers() {
        let doc = document();
        let op = &doc["paths"][TRANSFER_PATH]["post"];
        let mut headers = HeaderMap::new();
        for p in op["parameters"].as_array().unwrap() {
            let p = resolve(&doc, p);
            headers.insert(
                HeaderName::from_bytes(p["name"].as_str().unwrap().as_bytes()).unwrap(),
                HeaderValue::from_str(p["example"].as_str().unwrap()).unwrap(),
            );
        }
        parse_headers(&headers).expect("the example headers parse");
        let body = &op["requestBody"]["content"]["application/json"]["examples"]["plain"]["value"];
        TransferRequest::from_json(body).expect("the example body parses");
    }

    /// The characters a bracket class like `A-Za-z0-9_-` admits.
    fn class_members(class: &str) -> BTreeSet<u8> {
        let b = class.as_bytes();
        let (mut out, mut i) = (BTreeSet::new(), 0);
        while i < b.len() {
            if i + 2 < b.len() && b[i + 1] == b'-' {
                out.extend(b[i]..=b[i + 2]);
                i += 3;
            } else {
                out.insert(b[i]);
                i += 1;
            }
        }
        out
    }

    #[test]
    fn the_id_headers_pattern_admits_exactly_what_their_parsers_admit() {
        let class = class_members(ID_CHARS);
        for b in 0u8..128 {
            let one = |len: usize| (b as char).to_string().repeat(len);
            let admitted = [
                AspId::parse(&one(AspId::LEN)).is_ok(),
                AccessKey::parse(&one(AccessKey::LEN)).is_ok(),
                CryptoKeyId::parse(&one(CryptoKeyId::LEN)).is_ok(),
            ];
            assert_eq!(admitted, [class.contains(&b); 3], "character {:?}", b as char);
        }
    }
}
