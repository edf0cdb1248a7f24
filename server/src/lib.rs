//! The compiler of `converge-server`: an operator repository in, one catalog per node out.
//!
//! - [`repo`] loads a repository, from a directory or a git revision: the only I/O.
//! - [`site`] parses `site.yaml` and classifies nodes; [`role`] parses roles into templates;
//!   [`rollout`]: the waves a new commit reaches in turn (pure).
//! - [`compiler`] resolves roles, data, params and facts, renders, and checks each catalog;
//!   [`filters`]: the template filters Ansible and Salt users expect (pure).
//! - [`diff`] compares two compiles node by node.
//! - [`keys`] generates and stores signing keys and the key list, and signs catalogs.
//! - [`schemas`] generates the JSON Schemas of site.yaml, role files and catalogs.
//! - [`secrets`]: `data/secrets/`, values encrypted one by one with age to a list of recipients.
//! - [`ca`], [`db`], [`config`], [`fleet`], [`http`]: the server: its CA, state, configuration,
//!   enrollment and catalogs, and HTTPS. [`view`] and [`page`]: what operators see.
//!   [`metrics`]: `/metrics`. [`bootstrap`]: `/bootstrap.sh` and the server key's pin.
//!   [`schema`]: the state's tables, one schema for both engines; [`sql`]: queries written
//!   once for both engines; [`pg`]: the state in PostgreSQL, for several servers.
//! - [`cli`]: every command of `converge-server`, one module per group (`main.rs` parses).
//!
//! Invariants: after `repo`, everything is a pure function of the repository, the node name and
//! its facts; classification never reads facts; an undefined template variable is an error,
//! never an empty string.

pub mod bootstrap;
pub mod ca;
pub mod cli;
pub mod compiler;
pub mod config;
pub mod db;
pub mod diff;
pub mod filters;
pub mod fleet;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod page;
pub mod pg;
pub mod repo;
pub mod role;
pub mod rollout;
pub mod schema;
pub mod schemas;
pub mod secrets;
pub mod site;
pub mod sql;
pub mod view;
