//! The catalog: what one host should look like, fully resolved.
//!
//! One model, two spellings: YAML for people (`converge apply my.yaml`) and JSON on the wire.
//! A resource is a mapping whose first key is its kind and whose value is its title:
//!
//! ```yaml
//! - file: /etc/motd
//!   content: "hello\n"
//!   mode: "0644"
//!   requires: [directory:/etc]
//! ```
//!
//! An attribute a resource leaves out is unmanaged (the agent never touches it); only `ensure`
//! and `backup` have defaults. This module holds the types and their serde spellings; checking a
//! catalog as a whole is [`crate::validate`], reading a file is [`crate::load`].

pub use crate::content::Content;
use crate::time::Timestamp;
use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;

/// The catalog format this build writes for a catalog without sealed values.
pub const FORMAT: u32 = 1;
/// The format of a catalog that carries sealed values (`sealed`), and the newest major this
/// build reads.
pub const FORMAT_SEALED: u32 = 2;

#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// The format major version; an agent refuses a newer one.
    pub format: u32,
    /// The node this catalog was compiled for. Hand-written catalogs may omit it.
    pub host: Option<String>,
    pub serial: Option<u64>,
    pub issued_at: Option<Timestamp>,
    pub expires_at: Option<Timestamp>,
    pub source: Option<Source>,
    #[serde(default)]
    pub resources: Vec<Resource>,
    /// The sensitive fields taken out of `resources` (see [`crate::sealed`]), with their
    /// fingerprints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sealed: Vec<crate::sealed::Sealed>,
    /// Their values, in `sealed`'s order, as one age file encrypted to the one host the catalog
    /// is for (ASCII-armored); absent from a catalog compiled but not yet sealed to its host.
    pub sealed_values: Option<String>,
    /// Where each resource came from, by id: its role file and line, its template, and the
    /// place each value it read was taken from (`converge why`). Sent only to agents that read
    /// it ([`READS_PROVENANCE`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub provenance: BTreeMap<String, Origin>,
}

/// Put in a request's `formats` by agents that read [`Catalog::provenance`]: a server leaves it
/// out for others (an older agent refuses a field it does not know).
pub const READS_PROVENANCE: u32 = 3;

/// Put in a request's `formats` by agents that fetch blobs ([`FileSpec::content_sha256`]): a
/// server inlines text blobs for others, and refuses them a binary one.
pub const READS_BLOBS: u32 = 4;

/// Where the agent keeps the blobs its catalogs name, each as `sha256/HEX` (inside `--root`).
pub const BLOB_STORE: &str = "/var/lib/converge/blobs";

/// The largest blob a catalog may name: the agent holds one in memory to check and write it.
pub const MAX_BLOB: u64 = 256 << 20;

/// The hex digest of a `sha256:HEX` blob reference, when it is one.
pub fn blob_hex(reference: &str) -> Option<&str> {
    let hex = reference.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then_some(hex)
}

/// Where blob `hex` is kept.
pub fn blob_path(hex: &str) -> String {
    format!("{BLOB_STORE}/sha256/{hex}")
}

/// Where one resource came from. On the wire, an array `[file, line, template, values]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(from = "OriginWire", into = "OriginWire")]
pub struct Origin {
    /// The role's file in the repository (`roles/NAME.yaml`), and the line of the resource.
    pub file: String,
    pub line: u32,
    /// The template its content was rendered from (`templates/NAME`).
    pub template: Option<String>,
    /// Each value a field read, and where that value came from.
    pub values: Vec<Input>,
}

type OriginWire = (String, u32, Option<String>, Vec<Input>);

impl From<OriginWire> for Origin {
    fn from((file, line, template, values): OriginWire) -> Origin {
        Origin { file, line, template, values }
    }
}

impl From<Origin> for OriginWire {
    fn from(o: Origin) -> OriginWire {
        (o.file, o.line, o.template, o.values)
    }
}

impl Origin {
    /// The role's name: its file's, under `roles/`.
    pub fn role(&self) -> &str {
        let name = self.file.strip_prefix("roles/").unwrap_or(&self.file);
        name.strip_suffix(".yaml").or_else(|| name.strip_suffix(".yml")).unwrap_or(name)
    }
}

/// One value a field of a resource read while it was rendered. On the wire, an array
/// `[field, value, from, line]`: a catalog carries one per value of every resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(from = "InputWire", into = "InputWire")]
pub struct Input {
    /// The field (`content`, `mode`, `when`, `for_each`).
    pub field: String,
    /// The value as the template names it: `data.nginx.port`, `params.port`, `facts.cpus`.
    pub value: String,
    /// Where it came from: the data file of the hierarchy that supplied it, or one of
    /// [`Input::DEFAULT`] (the role's default), [`Input::FACTS`], [`Input::SITE`] (node attributes),
    /// [`Input::NAME`] (the node's name).
    pub from: String,
    /// The line that reads it: in the template ([`Origin::template`]) for `content` rendered
    /// from one, else in the role file.
    pub line: Option<u32>,
}

type InputWire = (String, String, String, Option<u32>);

impl From<InputWire> for Input {
    fn from((field, value, from, line): InputWire) -> Input {
        Input { field, value, from, line }
    }
}

impl From<Input> for InputWire {
    fn from(i: Input) -> InputWire {
        (i.field, i.value, i.from, i.line)
    }
}

impl Input {
    pub const DEFAULT: &'static str = "default";
    pub const FACTS: &'static str = "facts";
    pub const SITE: &'static str = "site";
    pub const NAME: &'static str = "name";

    /// Where it came from, for people.
    pub fn from_text(&self, origin: &Origin) -> String {
        match self.from.as_str() {
            Input::DEFAULT => format!("{} (the role's default)", origin.file),
            Input::FACTS => "the host's facts (reported at its run)".into(),
            Input::SITE => "site.yaml (the node's entry and the site's attributes)".into(),
            Input::NAME => "the node's name".into(),
            file => file.to_string(),
        }
    }

    /// The file and line that read it.
    pub fn read_at(&self, origin: &Origin) -> Option<String> {
        let file = match (&origin.template, self.field.as_str()) {
            (Some(t), "content") => t.as_str(),
            _ => origin.file.as_str(),
        };
        self.line.map(|l| format!("{file}:{l}"))
    }
}

impl Catalog {
    pub fn new(resources: Vec<Resource>) -> Catalog {
        Catalog {
            format: FORMAT,
            host: None,
            serial: None,
            issued_at: None,
            expires_at: None,
            source: None,
            resources,
            sealed: Vec::new(),
            sealed_values: None,
            provenance: BTreeMap::new(),
        }
    }
}

/// Where a compiled catalog came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub repository: String,
    pub commit: String,
}

/// Declares the kinds of resource: one list, from which [`Kind`] and [`Spec`] and their
/// dispatch are generated. Adding a kind: a spec struct, a line here, its checks in
/// [`crate::validate`], its provider, its schema, its docs.
macro_rules! kinds {
    ($($variant:ident($spec:ident) = $name:literal, path: $path:literal;)*) => {
        /// The kinds of resource this build knows.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Kind {
            $($variant,)*
        }

        impl Kind {
            pub const ALL: &'static [Kind] = &[$(Kind::$variant,)*];

            pub fn name(self) -> &'static str {
                match self {
                    $(Kind::$variant => $name,)*
                }
            }

            /// Kinds whose title is a path in the one shared namespace of paths.
            pub fn is_path(self) -> bool {
                match self {
                    $(Kind::$variant => $path,)*
                }
            }
        }

        /// The fields of a resource that depend on its kind.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Spec {
            $($variant($spec),)*
        }

        impl Spec {
            pub fn kind(&self) -> Kind {
                match self {
                    $(Spec::$variant(_) => Kind::$variant,)*
                }
            }

            /// Decodes the kind's fields from whatever serde deserializer carries them.
            pub fn deserialize_kind<'de, D: Deserializer<'de>>(kind: Kind, d: D) -> Result<Spec, D::Error> {
                Ok(match kind {
                    $(Kind::$variant => Spec::$variant($spec::deserialize(d)?),)*
                })
            }

            /// Combines two declarations of one kind field by field, or names the fields on
            /// which they differ (see [`crate::validate::merge`]).
            pub fn merge(&self, other: &Spec) -> Result<Spec, Vec<String>> {
                match (self, other) {
                    $((Spec::$variant(a), Spec::$variant(b)) => merge_fields(a, b).map(Spec::$variant),)*
                    _ => Err(vec!["kind".to_string()]),
                }
            }

            fn serialize_flat<S: Serializer>(&self, head: Head<'_>, meta: &Meta, s: S) -> Result<S::Ok, S::Error> {
                match self {
                    $(Spec::$variant(spec) => Flat { head, spec, meta }.serialize(s),)*
                }
            }

            /// The JSON Schema of a kind's own fields.
            #[cfg(feature = "schema")]
            pub fn schema_of(kind: Kind, g: &mut schemars::SchemaGenerator) -> schemars::Schema {
                use schemars::JsonSchema;
                match kind {
                    $(Kind::$variant => $spec::json_schema(g),)*
                }
            }
        }
    };
}

kinds! {
    File(FileSpec) = "file", path: true;
    Directory(DirectorySpec) = "directory", path: true;
    Symlink(SymlinkSpec) = "symlink", path: true;
    Package(PackageSpec) = "package", path: false;
    User(UserSpec) = "user", path: false;
    Group(GroupSpec) = "group", path: false;
    Service(ServiceSpec) = "service", path: false;
    Exec(ExecSpec) = "exec", path: false;
    Line(LineSpec) = "file_line", path: false;
    Block(BlockSpec) = "file_block", path: false;
    Sysctl(SysctlSpec) = "sysctl", path: false;
    Timer(TimerSpec) = "timer", path: false;
    Mount(MountSpec) = "mount", path: false;
    Repository(RepositorySpec) = "repository", path: false;
}

impl Kind {
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.iter().copied().find(|k| k.name() == name)
    }

    /// The kind a misspelt name, or another tool's name for it, probably means.
    pub fn close_to(name: &str) -> Option<Kind> {
        let habit = match name {
            "lineinfile" | "line" => Some(Kind::Line),
            "blockinfile" | "block" => Some(Kind::Block),
            "command" | "shell" => Some(Kind::Exec),
            "cron" | "cronjob" | "cron_job" => Some(Kind::Timer),
            "systemd" | "systemd_service" => Some(Kind::Service),
            "link" => Some(Kind::Symlink),
            "apt" | "dnf" | "yum" => Some(Kind::Package),
            "apt_repository" | "yum_repository" | "yumrepo" | "apt_source" | "source" => Some(Kind::Repository),
            _ => None,
        };
        habit.or_else(|| Kind::ALL.iter().copied().find(|k| crate::yaml::similar_name(name, k.name())))
    }

    pub fn names() -> String {
        Kind::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
    }
}

/// Merges two specs through their serialized form: a field set in one and not the other is
/// taken; set in both, it must be equal.
fn merge_fields<S: Serialize + de::DeserializeOwned>(a: &S, b: &S) -> Result<S, Vec<String>> {
    let to_map = |x: &S| match serde_json::to_value(x) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let (mut x, y) = (to_map(a), to_map(b));
    let mut conflicts = Vec::new();
    for (k, v) in y {
        match x.get(&k) {
            Some(existing) if *existing != v => conflicts.push(k),
            Some(_) => {}
            None => {
                x.insert(k, v);
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(conflicts);
    }
    serde_json::from_value(serde_json::Value::Object(x)).map_err(|e| vec![e.to_string()])
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `kind:title`, the identity of a resource. Path titles are normalised.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceId {
    pub kind: Kind,
    pub title: String,
}

/// Why a path, a title, a resource id or a resource's kind cannot be what the catalog says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("path `{path}` is relative; write it from the root, like `/{}`", path.trim_start_matches("./"))]
    Relative { path: String },
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path `{0}` contains `..`; write the path it means")]
    DotDot(String),
    #[error("path `{0}` has a component longer than 255 bytes")]
    LongComponent(String),
    #[error("the {0} title is empty")]
    EmptyTitle(Kind),
    #[error("`{0}` is not a resource id: write `kind:title`, like `file:/etc/motd`")]
    NotAnId(String),
    #[error("`{id}`: unknown resource kind `{kind}` (known: {})", Kind::names())]
    UnknownKind { id: String, kind: String },
    #[error("`{id}`: {cause}")]
    InId { id: String, cause: Box<IdError> },
    #[error("a resource's first key must be its kind: `{key}` is not one (did you mean `{close}`?)")]
    CloseKind { key: String, close: Kind },
    #[error("a resource's first key must be its kind ({kinds}), found `{key}`", kinds = Kind::names())]
    NotAKind { key: String },
}

impl ResourceId {
    /// Builds an id, normalising a path title; the error says what is wrong with the title.
    pub fn new(kind: Kind, title: &str) -> Result<ResourceId, IdError> {
        let title = if kind.is_path() {
            normalize_path(title)?
        } else if title.is_empty() {
            return Err(IdError::EmptyTitle(kind));
        } else {
            title.to_string()
        };
        Ok(ResourceId { kind, title })
    }

    /// Parses `kind:title`.
    pub fn parse(s: &str) -> Result<ResourceId, IdError> {
        let Some((kind, title)) = s.split_once(':') else {
            return Err(IdError::NotAnId(s.to_string()));
        };
        let Some(kind) = Kind::from_name(kind) else {
            return Err(IdError::UnknownKind { id: s.to_string(), kind: kind.to_string() });
        };
        ResourceId::new(kind, title).map_err(|e| IdError::InId { id: s.to_string(), cause: Box::new(e) })
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.title)
    }
}

impl Serialize for ResourceId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ResourceId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ResourceId::parse(&s).map_err(de::Error::custom)
    }
}

/// Normalises an absolute path: no trailing `/`, no `//`, no `.`; `..` and relative paths are
/// refused rather than guessed at.
pub fn normalize_path(p: &str) -> Result<String, IdError> {
    if !p.starts_with('/') {
        return Err(IdError::Relative { path: p.to_string() });
    }
    if p.contains('\0') {
        return Err(IdError::Nul);
    }
    let mut out = String::with_capacity(p.len());
    for comp in p.split('/') {
        match comp {
            "" | "." => {}
            ".." => return Err(IdError::DotDot(p.to_string())),
            c => {
                if c.len() > 255 {
                    return Err(IdError::LongComponent(p.to_string()));
                }
                out.push('/');
                out.push_str(c);
            }
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// The directory holding a normalised absolute path; `None` for `/`.
pub fn parent_path(path: &str) -> Option<&str> {
    match path.rfind('/') {
        _ if path == "/" => None,
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

/// `dir/name` for a normalised absolute directory path.
pub fn join_path(dir: &str, name: &str) -> String {
    if dir == "/" { format!("/{name}") } else { format!("{dir}/{name}") }
}

/// File permission bits, written as an octal string: `"0644"`, `"2755"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mode(pub u32);

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl Serialize for Mode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Mode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an octal mode string like \"0644\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Mode, E> {
                let ok = (3..=4).contains(&s.len()) && s.bytes().all(|b| (b'0'..=b'7').contains(&b));
                if !ok {
                    return Err(E::custom(format!("mode `{s}` is not 3 or 4 octal digits like \"0644\"")));
                }
                Ok(Mode(u32::from_str_radix(s, 8).expect("checked octal")))
            }
        }
        // As written: YAML's `0644` and JSON's `644` reach here as their text.
        d.deserialize_str(V)
    }
}

/// Whether the resource should exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Ensure {
    #[default]
    Present,
    Absent,
}

/// Fields every kind shares: relations and sensitivity.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// Resources that must be converged before this one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<ResourceId>,
    /// Resources refreshed (a service restarted, a refresh-only exec run) when this one changes;
    /// they also come after this one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<ResourceId>,
    /// Keeps the resource's content out of all output, diffs, logs, reports and backups.
    pub sensitive: Option<bool>,
    /// Commit-confirmed apply: once changed, the host must reach its server again (and pass
    /// `check`) within the deadline, or the change is undone.
    pub confirm: Option<Confirm>,
}

impl Meta {
    pub const FIELDS: &'static [&'static str] = &["requires", "notify", "sensitive", "confirm"];
}

/// The confirmation a change must get, as network engineers know it from `commit confirmed`:
/// after the change, the agent must reach a server over mutual TLS, and `check` must pass,
/// within `within` seconds; otherwise the path is restored as it was before the change (its
/// content, mode, owner, or its absence) and what it notified is refreshed again.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Confirm {
    /// Seconds the change has to be confirmed in, from the moment it is made
    /// (between [`Confirm::MIN_WITHIN`] and [`Confirm::MAX_WITHIN`]).
    pub within: u32,
    /// A command (argv, absolute program) that must also succeed: the service still answers,
    /// the resolver still resolves. Run with a timeout of what is left of the deadline.
    pub check: Option<Vec<String>>,
}

impl Confirm {
    pub const MIN_WITHIN: u32 = 10;
    pub const MAX_WITHIN: u32 = 3600;
}

/// A regular file, by absolute path: its content (text, a template's, or a file's from the
/// repository), mode and owner; replaced atomically, the old content kept in the backup store.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    pub ensure: Option<Ensure>,
    /// The whole content, as text.
    // (An agent may keep it aside while it runs: [`Content`].)
    pub content: Option<Content>,
    /// A file to take the content from; a loader resolves it into `content`.
    pub source: Option<String>,
    /// The content as a content-addressed blob (a binary or large file): `sha256:HEX`. The
    /// agent fetches it from its server (`/blobs/sha256/HEX`, mutual TLS) into its blob store
    /// and checks it against this signed hash before the file is replaced.
    pub content_sha256: Option<String>,
    /// The blob's size in bytes (with `content_sha256`).
    pub size: Option<u64>,
    pub mode: Option<Mode>,
    pub owner: Option<String>,
    pub group: Option<String>,
    /// Keep replaced content in the local backup store [true].
    pub backup: Option<bool>,
    /// A command run on the new content before it replaces the old: `%` is the temporary file.
    pub validate: Option<Vec<String>>,
    /// Allows replacing a directory or another type at the path.
    pub force: Option<bool>,
}

/// A directory, by absolute path: its mode and owner, and optionally what else it may hold
/// (`purge`).
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct DirectorySpec {
    pub ensure: Option<Ensure>,
    pub mode: Option<Mode>,
    pub owner: Option<String>,
    pub group: Option<String>,
    /// Remove unmanaged direct children [false].
    pub purge: Option<bool>,
    /// Fail instead of purging more than this many children [100].
    pub purge_limit: Option<u32>,
    /// Keep the content of what is removed in the backup store [true].
    pub backup: Option<bool>,
    /// Allows removing a non-empty directory, or replacing another type at the path.
    pub force: Option<bool>,
}

/// A symbolic link, by absolute path, to `target`.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct SymlinkSpec {
    pub ensure: Option<Ensure>,
    /// What the link points to, written into the link as it is.
    pub target: Option<String>,
    /// Allows replacing a file or directory at the path.
    pub force: Option<bool>,
}

/// A package, by name. `ensure`: present, absent, latest, or a distribution version (epoch
/// aware) or prefix like `1.24.*`.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct PackageSpec {
    pub ensure: Option<String>,
    /// Allows installing an older version than the one installed.
    pub allow_downgrade: Option<bool>,
}

/// How a user's supplementary groups are managed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Membership {
    /// Exactly the groups listed.
    Exact,
    /// At least the groups listed.
    Minimum,
}

/// A local user account, by name.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    pub ensure: Option<Ensure>,
    pub uid: Option<u32>,
    /// The primary group, by name or number.
    pub gid: Option<String>,
    pub groups: Option<Vec<String>>,
    /// [exact]
    pub membership: Option<Membership>,
    pub home: Option<String>,
    pub shell: Option<String>,
    pub comment: Option<String>,
    pub system: Option<bool>,
    /// Always sensitive: never shown, logged or reported.
    pub password_hash: Option<String>,
    /// Removes the home directory with the user [false].
    pub remove_home: Option<bool>,
}

/// A local group, by name.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    pub ensure: Option<Ensure>,
    pub gid: Option<u32>,
    pub system: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum ServiceEnsure {
    Running,
    Stopped,
}

/// What a notify does to a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum Refresh {
    Restart,
    Reload,
    ReloadOrRestart,
    None,
}

/// A systemd service, by unit name.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub ensure: Option<ServiceEnsure>,
    pub enabled: Option<bool>,
    /// [restart]
    pub refresh: Option<Refresh>,
}

/// A guarded command, by a name of its own; `command` is an argv, never a shell string.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    pub command: Vec<String>,
    /// Runs only while this path does not exist.
    pub creates: Option<String>,
    /// Runs only when this command fails (it must only read).
    pub unless: Option<Vec<String>>,
    /// Runs only when this command succeeds (it must only read).
    pub onlyif: Option<Vec<String>>,
    /// Runs only when notified [false].
    pub refreshonly: Option<bool>,
    /// Seconds before it is killed [300].
    pub timeout: Option<u32>,
    pub user: Option<String>,
    pub cwd: Option<String>,
    pub environment: Option<BTreeMap<String, String>>,
    /// Given to the command (not to its guards) on standard input, and never shown: the way
    /// to hand it a secret, which in an argument list any user of the host could read.
    pub stdin: Option<String>,
}

/// One line of a file converge does not own, by a name of its own: Puppet's `file_line`,
/// Ansible's `lineinfile`. The rest of the file is left byte for byte as it is.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct LineSpec {
    pub ensure: Option<Ensure>,
    /// The file, by absolute path (never followed through a symlink).
    pub path: String,
    /// The whole line, without its newline.
    pub line: Option<String>,
    /// A regular expression: the line it matches is replaced by `line` (present) or removed
    /// (absent). More than one match is an error unless `multiple`.
    #[serde(rename = "match")]
    pub matches: Option<String>,
    /// Replaces (or removes) every line `match` matches [false].
    pub multiple: Option<bool>,
    /// Where a new line goes: after the last line this regular expression matches (else at the end).
    pub after: Option<String>,
    /// Where a new line goes: before the first line this regular expression matches (else at the end).
    pub before: Option<String>,
    /// Creates the file (empty, mode 0644) when it does not exist [false].
    pub create: Option<bool>,
    /// Keep the file as it was in the backup store [true].
    pub backup: Option<bool>,
    /// A command run on the edited file before it replaces the old one: `%` is the temporary file.
    pub validate: Option<Vec<String>>,
}

/// A block of lines between two marker lines in a file converge does not own, by a name of its
/// own: Ansible's `blockinfile`. The rest of the file is left byte for byte as it is.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct BlockSpec {
    pub ensure: Option<Ensure>,
    /// The file, by absolute path (never followed through a symlink).
    pub path: String,
    /// The lines between the markers.
    pub content: Option<String>,
    /// The marker lines, with `{mark}` for BEGIN and END [`# {mark} converge NAME`].
    pub marker: Option<String>,
    /// Where a new block goes: after the last line this regular expression matches (else at the end).
    pub after: Option<String>,
    /// Where a new block goes: before the first line this regular expression matches (else at the end).
    pub before: Option<String>,
    /// Creates the file (empty, mode 0644) when it does not exist [false].
    pub create: Option<bool>,
    /// Keep the file as it was in the backup store [true].
    pub backup: Option<bool>,
    /// A command run on the edited file before it replaces the old one: `%` is the temporary file.
    pub validate: Option<Vec<String>>,
}

/// A kernel parameter, by its key (`net.ipv4.ip_forward`, or the `/` form for names with
/// dots): its live value and the value it gets at boot, kept in
/// `/etc/sysctl.d/99-zz-converge-KEY.conf` (read after every other file there).
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct SysctlSpec {
    /// `absent` removes converge's file (the live value stays until the next boot).
    pub ensure: Option<Ensure>,
    /// The value, as `sysctl` prints it (several numbers separated by spaces for a vector).
    #[serde(default, deserialize_with = "scalar_text")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "schema::text_or_number"))]
    pub value: Option<String>,
}

/// A scalar as its text: YAML's `value: 1` and JSON's `"value": 1` are the text `1`.
fn scalar_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a value, like 1 or \"4096 87380 6291456\"")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
            Ok(Some(s.to_string()))
        }
        fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
            Ok(Some(n.to_string()))
        }
        fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
            Ok(Some(n.to_string()))
        }
    }
    d.deserialize_any(V)
}

/// A command run on a schedule, by a name of its own (letters, digits, `-`, `_`): a systemd
/// timer `converge-NAME.timer` and the service it starts, in /etc/systemd/system. Takes cron's
/// five fields as they are.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct TimerSpec {
    pub ensure: Option<Ensure>,
    /// The command, an argv (never a shell string): `[/usr/local/bin/backup, --all]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// When: cron's five fields (`*/15 * * * *`, `30 2 * * 1-5`), a cron shorthand (`@daily`),
    /// or a systemd calendar event (`Mon..Fri 03:00`, `*:0/15`).
    pub schedule: Option<String>,
    /// The account it runs as [root].
    pub user: Option<String>,
    pub cwd: Option<String>,
    pub environment: Option<BTreeMap<String, String>>,
    /// Each run starts up to this many seconds late, at random: the same job across a fleet
    /// does not start on every host at once [0].
    pub randomized_delay: Option<u32>,
    /// A run missed while the host was off runs when it is back [true].
    pub persistent: Option<bool>,
    /// Seconds a run may take before it is stopped [no limit].
    pub timeout: Option<u32>,
    /// What `systemctl list-timers` and the journal call it [converge timer NAME].
    pub description: Option<String>,
}

/// What a `mount` should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum MountEnsure {
    /// In /etc/fstab, and mounted.
    Mounted,
    /// In /etc/fstab, and not mounted.
    Unmounted,
    /// Neither.
    Absent,
}

/// A filesystem, by its mount point: its entry in /etc/fstab and whether it is mounted
/// (Puppet's `mount`, Ansible's `mount`). The mount point is a directory declared on its own.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct MountSpec {
    /// [mounted]
    pub ensure: Option<MountEnsure>,
    /// What is mounted: `/dev/sdb1`, `UUID=...`, `LABEL=...`, `server:/export`, `tmpfs`.
    pub device: Option<String>,
    /// `ext4`, `xfs`, `nfs`, `tmpfs`...
    pub fstype: Option<String>,
    /// As fstab and `mount -o` take them [defaults].
    pub options: Option<String>,
    /// fstab's fifth field [0].
    pub dump: Option<u8>,
    /// fstab's sixth field: the order of boot-time checks (0: never) [0].
    pub pass: Option<u8>,
}

/// A package repository and the key its packages are signed with, by a name of its own:
/// on apt hosts a deb822 `.sources` file whose `Signed-By` names the key, on dnf hosts a
/// `.repo` file with `gpgcheck`. Packages are converged after every repository, and a changed
/// repository is fetched at once: one whose address or signature fails is put back as it was.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RepositorySpec {
    pub ensure: Option<Ensure>,
    /// Where it is: `https://deb.example.com/debian`, `https://rpm.example.com/el9/$basearch`.
    pub url: Option<String>,
    /// apt: the suites (`[bookworm]`, `[./]` for a flat repository).
    pub suites: Option<Vec<String>>,
    /// apt: the components (`[main]`); none for a flat repository.
    pub components: Option<Vec<String>>,
    /// The OpenPGP public key its packages (apt: its Release file) are signed with,
    /// ASCII-armored.
    pub key: Option<String>,
    /// [true]
    pub enabled: Option<bool>,
}

pub const DEFAULT_PURGE_LIMIT: u32 = 100;

impl Spec {
    /// Whether the resource should exist (packages of any version, running or stopped
    /// services and commands count as present).
    pub fn ensure(&self) -> Ensure {
        match self {
            Spec::File(s) => s.ensure.unwrap_or_default(),
            Spec::Directory(s) => s.ensure.unwrap_or_default(),
            Spec::Symlink(s) => s.ensure.unwrap_or_default(),
            Spec::Package(s) if s.ensure.as_deref() == Some("absent") => Ensure::Absent,
            Spec::User(s) => s.ensure.unwrap_or_default(),
            Spec::Group(s) => s.ensure.unwrap_or_default(),
            Spec::Line(s) => s.ensure.unwrap_or_default(),
            Spec::Block(s) => s.ensure.unwrap_or_default(),
            Spec::Sysctl(s) => s.ensure.unwrap_or_default(),
            Spec::Timer(s) => s.ensure.unwrap_or_default(),
            Spec::Mount(s) if s.ensure == Some(MountEnsure::Absent) => Ensure::Absent,
            Spec::Mount(_) => Ensure::Present,
            Spec::Repository(s) => s.ensure.unwrap_or_default(),
            Spec::Package(_) | Spec::Service(_) | Spec::Exec(_) => Ensure::Present,
        }
    }
}

/// Where a `sysctl` keeps the value its key gets at boot: named to sort after every other
/// file of the sysctl.d directories (`99-sysctl.conf` included), so that its value wins.
pub fn sysctl_file(key: &str) -> String {
    format!("/etc/sysctl.d/99-zz-converge-{}.conf", key.replace('/', ":"))
}

/// One declared resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub id: ResourceId,
    pub meta: Meta,
    pub spec: Spec,
}

impl Resource {
    pub fn new(id: ResourceId, meta: Meta, spec: Spec) -> Resource {
        debug_assert_eq!(id.kind, spec.kind());
        Resource { id, meta, spec }
    }

    pub fn sensitive(&self) -> bool {
        self.meta.sensitive.unwrap_or(false)
    }

    /// The path of a path kind.
    pub fn path(&self) -> Option<&str> {
        self.id.kind.is_path().then_some(self.id.title.as_str())
    }

    /// The file a kind that is not a path kind writes into: the file a `file_line` or
    /// `file_block` edits, a `sysctl`'s file under /etc/sysctl.d. Protected like paths, kept by a purge,
    /// and converged after the directory (and the `file`) that declares it.
    pub fn writes(&self) -> Vec<std::borrow::Cow<'_, str>> {
        match &self.spec {
            Spec::Line(l) => vec![l.path.as_str().into()],
            Spec::Block(b) => vec![b.path.as_str().into()],
            Spec::Sysctl(_) => vec![sysctl_file(&self.id.title).into()],
            Spec::Timer(_) => crate::providers::timer::unit_files(&self.id.title).map(Into::into).into(),
            Spec::Mount(_) => vec![crate::providers::mount::FSTAB.into()],
            // Which files depends on the host's package manager: every one it may be.
            Spec::Repository(_) => crate::providers::package::TOOLS
                .iter()
                .flat_map(|t| t.repository_paths(&self.id.title))
                .map(Into::into)
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// A one-entry map `{kind: title}`, so that it can lead a flattened resource.
struct Head<'a>(&'a ResourceId);

impl Serialize for Head<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry(self.0.kind.name(), &self.0.title)?;
        m.end()
    }
}

#[derive(Serialize)]
struct Flat<'a, S: Serialize> {
    #[serde(flatten)]
    head: Head<'a>,
    #[serde(flatten)]
    spec: &'a S,
    #[serde(flatten)]
    meta: &'a Meta,
}

impl Serialize for Resource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.spec.serialize_flat(Head(&self.id), &self.meta, s)
    }
}

impl<'de> Deserialize<'de> for Resource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ResourceVisitor)
    }
}

struct ResourceVisitor;

impl<'de> Visitor<'de> for ResourceVisitor {
    type Value = Resource;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a resource: a mapping whose first key is its kind, like `file: /etc/motd`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Resource, A::Error> {
        let Some(first) = map.next_key::<String>()? else {
            return Err(de::Error::custom("empty resource: its first key must be its kind, like `file: /etc/motd`"));
        };
        let kind = kind_from_first_key(&first).map_err(de::Error::custom)?;
        let title: String = map.next_value()?;
        let id = ResourceId::new(kind, &title).map_err(de::Error::custom)?;
        let mut split = MetaSplitter { inner: map, meta: Meta::default(), seen: Vec::new() };
        let spec = Spec::deserialize_kind(kind, de::value::MapAccessDeserializer::new(&mut split))?;
        Ok(Resource::new(id, split.meta, spec))
    }
}

/// The kind named by a resource's first key, or why it is not one.
pub fn kind_from_first_key(key: &str) -> Result<Kind, IdError> {
    Kind::from_name(key).ok_or_else(|| match Kind::close_to(key) {
        Some(close) => IdError::CloseKind { key: key.to_string(), close },
        None => IdError::NotAKind { key: key.to_string() },
    })
}

#[cfg(feature = "schema")]
mod schema {
    use super::*;
    use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
    use std::borrow::Cow;

    /// A value written as text or as a number (kept as its text).
    pub fn text_or_number(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"anyOf": [{"type": "string"}, {"type": "integer"}]})
    }

    impl JsonSchema for Mode {
        fn schema_name() -> Cow<'static, str> {
            "Mode".into()
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            // YAML editors read `mode: 0644` as the number 644: both spellings are modes.
            json_schema!({
                "anyOf": [
                    {"type": "string", "pattern": "^[0-7]{3,4}$"},
                    {"type": "integer", "minimum": 0, "maximum": 7777}
                ],
                "description": "Permission bits in octal, like \"0644\" (a number's digits are read as octal ones: 644 is 0644)"
            })
        }
    }

    impl JsonSchema for ResourceId {
        fn schema_name() -> Cow<'static, str> {
            "ResourceId".into()
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            let kinds = Kind::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join("|");
            json_schema!({"type": "string", "pattern": format!("^({kinds}):.+"), "description": "kind:title, like file:/etc/motd"})
        }
    }

    impl JsonSchema for Timestamp {
        fn schema_name() -> Cow<'static, str> {
            "Timestamp".into()
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({"type": "string", "format": "date-time", "description": "UTC, like 2026-11-30T03:50:07Z"})
        }
    }

    impl JsonSchema for Resource {
        fn schema_name() -> Cow<'static, str> {
            "Resource".into()
        }
        fn json_schema(g: &mut SchemaGenerator) -> Schema {
            let variants: Vec<serde_json::Value> = Kind::ALL.iter().map(|k| resource_variant(*k, g, &[])).collect();
            json_schema!({"oneOf": variants})
        }
    }

    /// The schema of one kind of resource: its first key (the kind, whose value is the title),
    /// its fields, the shared fields, and `extra` properties (a role's directives).
    pub fn resource_variant(
        kind: Kind,
        g: &mut SchemaGenerator,
        extra: &[(&str, serde_json::Value)],
    ) -> serde_json::Value {
        let spec = Spec::schema_of(kind, g).to_value();
        let meta = Meta::json_schema(g).to_value();
        let mut properties = serde_json::Map::new();
        let title = if kind.is_path() { "the absolute path" } else { "the name" };
        properties.insert(
            kind.name().into(),
            serde_json::json!({"type": "string", "description": format!("{} {kind}: {title}", if kind.name().starts_with(['a', 'e', 'i', 'o', 'u']) { "An" } else { "A" })}),
        );
        for part in [&spec, &meta] {
            if let Some(p) = part.get("properties").and_then(|p| p.as_object()) {
                properties.extend(p.clone());
            }
        }
        for (k, v) in extra {
            properties.insert((*k).into(), v.clone());
        }
        let mut required = vec![serde_json::Value::from(kind.name())];
        let description = spec.get("description").cloned().unwrap_or_default();
        required.extend(spec.get("required").and_then(|r| r.as_array()).cloned().unwrap_or_default());
        serde_json::json!({
            "type": "object",
            "title": kind.name(),
            "description": description,
            "properties": properties,
            "required": required,
            "additionalProperties": false,
        })
    }
}

#[cfg(feature = "schema")]
pub use schema::resource_variant;

/// Passes a resource's keys through to its kind, keeping the shared [`Meta`] fields aside.
struct MetaSplitter<A> {
    inner: A,
    meta: Meta,
    seen: Vec<&'static str>,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for &mut MetaSplitter<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        loop {
            let Some(key) = self.inner.next_key::<String>()? else {
                return Ok(None);
            };
            let Some(&field) = Meta::FIELDS.iter().find(|f| **f == key) else {
                let d: de::value::StringDeserializer<A::Error> = key.into_deserializer();
                return seed.deserialize(d).map(Some);
            };
            if self.seen.contains(&field) {
                return Err(de::Error::duplicate_field(field));
            }
            self.seen.push(field);
            match field {
                "requires" => self.meta.requires = self.inner.next_value()?,
                "notify" => self.meta.notify = self.inner.next_value()?,
                "confirm" => self.meta.confirm = self.inner.next_value()?,
                _ => self.meta.sensitive = self.inner.next_value()?,
            }
        }
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.inner.next_value_seed(seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised() {
        assert_eq!(normalize_path("/etc//nginx/./conf.d/").unwrap(), "/etc/nginx/conf.d");
        assert_eq!(normalize_path("/").unwrap(), "/");
        assert!(normalize_path("etc/motd").unwrap_err().to_string().contains("relative"));
        assert!(normalize_path("/etc/../motd").unwrap_err().to_string().contains(".."));
    }

    #[test]
    fn ids_parse_and_print() {
        let id = ResourceId::parse("directory:/srv/app/").unwrap();
        assert_eq!(id.to_string(), "directory:/srv/app");
        assert!(ResourceId::parse("service").unwrap_err().to_string().contains("kind:title"));
        assert!(ResourceId::parse("widget:x").unwrap_err().to_string().contains("unknown resource kind"));
    }

    #[test]
    fn json_round_trip_keeps_kind_first() {
        let r = Resource::new(
            ResourceId::new(Kind::File, "/etc/motd").unwrap(),
            Meta { requires: vec![ResourceId::parse("directory:/etc").unwrap()], ..Meta::default() },
            Spec::File(FileSpec { content: Some("hi\n".into()), mode: Some(Mode(0o644)), ..FileSpec::default() }),
        );
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, r#"{"file":"/etc/motd","content":"hi\n","mode":"0644","requires":["directory:/etc"]}"#);
        let back: Resource = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn json_refuses_unknown_and_duplicate_fields() {
        let e = serde_json::from_str::<Resource>(r#"{"file":"/x","mdoe":"0644"}"#).unwrap_err().to_string();
        assert!(e.to_string().contains("unknown field `mdoe`"), "{e}");
        let e =
            serde_json::from_str::<Resource>(r#"{"file":"/x","requires":[],"requires":[]}"#).unwrap_err().to_string();
        assert!(e.to_string().contains("duplicate field"), "{e}");
        let e = serde_json::from_str::<Resource>(r#"{"mode":"0644","file":"/x"}"#).unwrap_err().to_string();
        assert!(e.to_string().contains("first key must be its kind"), "{e}");
        let e = serde_json::from_str::<Resource>(r#"{"file":"/x","mode":420}"#).unwrap_err().to_string();
        assert!(e.to_string().contains("octal mode"), "{e}");
    }
}
