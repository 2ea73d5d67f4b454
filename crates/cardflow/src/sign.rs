//! `cardflow sign`: prints a signed request so a person can call the API with curl,
//! and decrypts encrypted responses. Credentials come from a fixture (the demo one
//! by default) or from flags.

use anyhow::{anyhow, bail, Context};
use base64::Engine;
use cardflow_domain::ClientTimeZone;
use cardflow_gateway::client::{self, Credentials, SignOptions};
use cardflow_gateway::crypto;
use clap::Args;
use std::process::ExitCode;

#[derive(Debug, Clone, Args)]
pub struct SignArgs {
    /// Fixture to take credentials from (the first ASP, its first keys).
    #[arg(long, default_value = "fixtures/demo.json")]
    fixture: std::path::PathBuf,
    #[arg(long)]
    asp_id: Option<String>,
    #[arg(long)]
    access_key: Option<String>,
    #[arg(long)]
    signing_secret: Option<String>,
    #[arg(long)]
    crypto_key_id: Option<String>,
    /// The data key, base64 of 32 bytes.
    #[arg(long)]
    crypto_key: Option<String>,
    #[arg(long, default_value = "POST")]
    method: String,
    #[arg(long, default_value = "/api/v1/transfer/balance")]
    path: String,
    /// The JSON body (plain; encrypted with --encrypt).
    #[arg(long, default_value = "")]
    body: String,
    /// Encrypt the body with the data key (sends X-KM-Crypto-Key-Id).
    #[arg(long)]
    encrypt: bool,
    /// Use this correlation id instead of a fresh one.
    #[arg(long)]
    correlation_id: Option<String>,
    #[arg(long, default_value = "KST")]
    time_zone: String,
    /// Base URL for the curl command.
    #[arg(long, env = "CARDFLOW_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// `curl` (a complete command) or `headers` (one `Name: value` per line).
    #[arg(long, default_value = "curl")]
    format: String,
    /// Decrypt a response body (the `{"encData":...}` envelope or the bare text)
    /// instead of signing; `-` reads it from standard input.
    #[arg(long)]
    decrypt: Option<String>,
}

fn credentials(args: &SignArgs) -> anyhow::Result<Credentials> {
    let fixture: serde_json::Value = match std::fs::read_to_string(&args.fixture) {
        Ok(text) => serde_json::from_str(&text).with_context(|| format!("parsing {}", args.fixture.display()))?,
        Err(_) => serde_json::Value::Null,
    };
    let asp = &fixture["asps"][0];
    let pick = |flag: &Option<String>, v: &serde_json::Value, what: &str| -> anyhow::Result<String> {
        flag.clone()
            .or_else(|| v.as_str().map(str::to_string))
            .ok_or_else(|| anyhow!("no {what}: pass --{what} or a fixture that has one"))
    };
    let asp_id = pick(&args.asp_id, &asp["aspId"], "asp-id")?;
    let access_key = pick(&args.access_key, &asp["accessKeys"][0]["accessKey"], "access-key")?;
    let signing_secret = pick(&args.signing_secret, &asp["accessKeys"][0]["signingSecret"], "signing-secret")?;
    let key_id = args.crypto_key_id.clone().or_else(|| asp["cryptoKeys"][0]["keyId"].as_str().map(str::to_string));
    let key_b64 = args.crypto_key.clone().or_else(|| asp["cryptoKeys"][0]["key"].as_str().map(str::to_string));
    let crypto_key = match (key_id, key_b64) {
        (Some(id), Some(b64)) => {
            let raw =
                base64::engine::general_purpose::STANDARD.decode(b64.trim()).context("crypto key is not base64")?;
            let key: [u8; 32] = raw.try_into().map_err(|_| anyhow!("a crypto key is 32 bytes"))?;
            Some((id, key))
        }
        _ => None,
    };
    Ok(Credentials { asp_id, access_key, signing_secret, crypto_key })
}

pub fn run(args: SignArgs) -> anyhow::Result<ExitCode> {
    let creds = credentials(&args)?;
    if let Some(text) = &args.decrypt {
        let text = if text == "-" { std::io::read_to_string(std::io::stdin())? } else { text.clone() };
        let (_, key) = creds.crypto_key.as_ref().ok_or_else(|| anyhow!("no crypto key to decrypt with"))?;
        let plain = crypto::open_envelope(key, text.trim().as_bytes())
            .or_else(|_| crypto::decrypt(key, text.trim()))
            .map_err(|_| anyhow!("decryption failed"))?;
        println!("{}", String::from_utf8_lossy(&plain));
        return Ok(ExitCode::SUCCESS);
    }
    let tz =
        ClientTimeZone::parse(&args.time_zone).ok_or_else(|| anyhow!("unsupported time zone {}", args.time_zone))?;
    if args.encrypt && creds.crypto_key.is_none() {
        bail!("--encrypt needs a crypto key");
    }
    let signed = client::sign(
        &creds,
        SignOptions {
            method: &args.method,
            path: &args.path,
            body: args.body.as_bytes(),
            encrypt: args.encrypt,
            correlation_id: args.correlation_id.clone(),
            time_zone: tz,
            now: chrono::Utc::now(),
        },
    );
    match args.format.as_str() {
        "curl" => println!("{}", signed.curl(&args.url)),
        "headers" => {
            for (k, v) in &signed.headers {
                println!("{k}: {v}");
            }
            if args.encrypt {
                println!();
                println!("{}", String::from_utf8_lossy(&signed.body));
            }
        }
        other => bail!("unknown --format {other}: use curl or headers"),
    }
    Ok(ExitCode::SUCCESS)
}
