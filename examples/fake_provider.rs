//! A fake LLM provider on a local port, for trying clients, the gateway and demos by hand.
//!
//! Run with: cargo run --example fake_provider -- --listen 127.0.0.1:0
//!
//! It prints the address it bound and serves until Ctrl-C. Pick a behaviour with the model
//! name or the `x-fake-behaviour` header, for example:
//!
//! ```text
//! curl -s $URL/v1/chat/completions -H 'content-type: application/json' \
//!   -d '{"model":"fake-429-retry-after-2","messages":[{"role":"user","content":"hi"}]}'
//! ```

use std::net::SocketAddr;

use clap::Parser;
use tokio::net::TcpListener;
use troupe::testing::fake_provider::{FakeConfig, FakeProvider, KNOWN_BEHAVIOURS};

/// Command-line options.
#[derive(Debug, Parser)]
struct Options {
    /// Address to listen on; port 0 lets the system pick one.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Requests per minute per model before the fake answers 429.
    #[arg(long, default_value_t = FakeConfig::default().rpm)]
    rpm: u64,
    /// Tokens per minute per model before the fake answers 429.
    #[arg(long, default_value_t = FakeConfig::default().tpm)]
    tpm: u64,
    /// The text of every successful reply.
    #[arg(long)]
    reply: Option<String>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let options = Options::parse();
    let defaults = FakeConfig::default();
    let config = FakeConfig {
        rpm: options.rpm,
        tpm: options.tpm,
        reply: options.reply.unwrap_or(defaults.reply.clone()),
        ..defaults
    };
    let listener = TcpListener::bind(options.listen).await?;
    let fake = FakeProvider::serve(listener, config)?;
    println!("fake provider listening on {}", fake.base_url());
    println!(
        "  OpenAI:    POST {}/v1/chat/completions, GET {}/v1/models",
        fake.base_url(),
        fake.base_url()
    );
    println!("  Anthropic: POST {}/v1/messages", fake.base_url());
    println!(
        "  Gemini:    POST {}/v1beta/models/{{model}}:generateContent",
        fake.base_url()
    );
    println!("behaviours (model fake-<name> or header x-fake-behaviour): {KNOWN_BEHAVIOURS}");
    tokio::signal::ctrl_c().await?;
    println!("stopping after {} requests", fake.arrivals().len());
    fake.shutdown().await;
    Ok(())
}
