//! The shared vocabulary of converge.
//!
//! - [`catalog`]: the catalog model and its two spellings (YAML for people, JSON on the wire).
//! - [`content`]: a file's content, held or kept aside in a store outside the heap.
//! - [`load`]: text -> checked catalog and [`plan`], every problem with file:line:col.
//! - [`validate`], [`plan`]: pure checks and the stable dependency order.
//! - [`host`]: the boundary through which providers reach a system; [`host::memory`] for tests.
//! - [`providers`]: inspect, diff and apply for each kind, over a [`host::Host`].
//! - [`engine`]: runs a plan resource by resource and emits [`report`] events to a sink.
//! - [`trust`]: signed envelopes, key lists, and every check before a catalog is believed.
//! - [`sealed`]: secrets in a catalog, encrypted to the one host it is for, opened in memory.
//! - [`wire`]: the HTTPS API's bodies and their bounds; [`text`]: hostile text made printable.
//! - [`yaml`]: YAML with the line and column of every node; [`diag`]: file:line:col messages;
//!   [`stream`]: a JSON catalog decoded one resource at a time.
//! - [`settings`]: `agent.toml` and `server.toml`; [`time`]: RFC 3339 timestamps and the one
//!   reader of the clock; [`hash`]: `sha256:HEX`; [`version`]: dpkg's and rpm's version order.
//!
//! Invariants: this crate never touches the OS itself (all system access goes through
//! `Host`), never prints (output goes through `report::Sink`), and never panics on bad input.

pub mod catalog;
pub mod content;
pub mod diag;
pub mod engine;
pub mod hash;
pub mod host;
pub mod load;
pub mod plan;
pub mod providers;
pub mod report;
pub mod sealed;
pub mod settings;
pub mod stream;
pub mod text;
pub mod time;
pub mod trust;
pub mod validate;
pub mod version;
pub mod wire;
pub mod yaml;
