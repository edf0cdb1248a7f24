//! `keygen`, `sign` and `keys`: the catalog keys and the signed list of them.

use super::*;
use clap::{Subcommand, ValueEnum};
use converge_modules::catalog::Catalog;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    Root,
    Catalog,
}

#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Add a public key (PEM) to the list.
    Add {
        #[arg(long, value_name = "FILE")]
        keys: PathBuf,
        #[arg(long, value_name = "KEYFILE")]
        root_key: PathBuf,
        public: PathBuf,
        #[arg(long, value_enum, default_value_t = Role::Catalog)]
        role: Role,
    },
    /// Remove a key from the list by its id.
    Retire {
        #[arg(long, value_name = "FILE")]
        keys: PathBuf,
        #[arg(long, value_name = "KEYFILE")]
        root_key: PathBuf,
        key_id: String,
    },
    /// Show the list.
    List {
        #[arg(long, value_name = "FILE")]
        keys: PathBuf,
    },
    /// Replace the server's catalog key, in one step on a live fleet: a new key, the next key
    /// list without the old one (signed by the root key, brought online for this command
    /// only), the new key in place. The server takes both in within a second; hosts adopt the
    /// list with their next catalog.
    Rotate {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[arg(long, value_name = "KEYFILE")]
        root_key: PathBuf,
    },
    /// The key the server signs with, the key list, and which version hosts hold.
    Status {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

/// Signs `catalog` with the key in `key_path`, attaching the key list in `keys` if given.
pub fn signed(
    catalog: Catalog,
    key_path: &Path,
    keys: Option<&Path>,
    serial: Option<u64>,
    ttl: &str,
) -> Result<String> {
    let key = crate::keys::read_private(key_path)?;
    let list = keys.map(crate::keys::read_key_list).transpose()?;
    if let Some((list, _)) = &list {
        let id = converge_modules::trust::key_id(&key.verifying_key());
        if !list.keys.iter().any(|k| k.id == id && k.role == converge_modules::trust::KeyRole::Catalog) {
            bail!(
                "{} (key {id}) is not a catalog key of the list {}: agents would refuse what it signs",
                key_path.display(),
                keys.unwrap().display()
            );
        }
    }
    let ttl = converge_modules::settings::parse_duration(ttl).map_err(anyhow::Error::msg)?;
    crate::keys::sign_catalog(
        catalog,
        &key,
        list.map(|(_, env)| env),
        serial,
        ttl,
        converge_modules::time::Timestamp::now(),
    )
}

pub fn sign(key: &Path, file: &Path, keys: Option<&Path>, serial: Option<u64>, ttl: &str) -> Result<u8> {
    let name = file.display().to_string();
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read catalog {name}"))?;
    let base = file.parent().unwrap_or(Path::new(".")).to_path_buf();
    let read_source = |src: &str| Ok(std::fs::read_to_string(base.join(src))?);
    let loaded = converge_modules::load::load(&name, &text, Some(&read_source)).map_err(|d| {
        anyhow::anyhow!("{}\n\n{name}: {} problems; nothing was signed", d.render(Some(&text)), d.len())
    })?;
    print!("{}", signed(loaded.catalog, key, keys, serial, ttl)?);
    Ok(0)
}

pub fn keygen(out: &Path, name: Option<&str>) -> Result<u8> {
    match name {
        Some(name) => {
            let id = crate::keys::keygen_one(out, name)?;
            println!("wrote {0}/{name}.key (private, 0600) and {0}/{name}.pub: key {id}", out.display());
            println!(
                "add it to the list agents trust with: converge-server keys add --keys KEYLIST --root-key ROOTKEY {}/{name}.pub",
                out.display()
            );
        }
        None => {
            let ids = crate::keys::keygen(out)?;
            let d = out.display();
            println!("root key    {d}/root.key     (id {}): signs the key list only; keep it offline", ids[0]);
            println!("catalog key {d}/catalog.key  (id {}): signs catalogs; stays on the server", ids[1]);
            println!(
                "key list    {d}/trusted-keys.json (version 1): install on agents as /etc/converge/trusted-keys.json"
            );
        }
    }
    Ok(0)
}

pub fn keys_command(action: KeysAction) -> Result<u8> {
    use crate::keys;
    use converge_modules::trust::KeyRole;
    match action {
        KeysAction::Add { keys: list, root_key, public, role } => {
            let root = keys::read_private(&root_key)?;
            let key = keys::read_public(&public)?;
            let role = if role == Role::Root { KeyRole::Root } else { KeyRole::Catalog };
            let v = keys::add(&list, &root, &key, role)?;
            println!("{}: version {v}, with key {}", list.display(), converge_modules::trust::key_id(&key));
        }
        KeysAction::Retire { keys: list, root_key, key_id } => {
            let root = keys::read_private(&root_key)?;
            let v = keys::retire(&list, &root, &key_id)?;
            println!("{}: version {v}, without key {key_id}", list.display());
        }
        KeysAction::Rotate { config, root_key } => {
            let (config, _) = open_db(&config)?;
            let root = keys::read_private(&root_key)?;
            let (old, new, version) = keys::rotate(&config.trusted_keys, &config.signing_key, &root)?;
            println!("{}: version {version}, with catalog key {new} instead of {old}", config.trusted_keys.display());
            println!(
                "- the server signs with {new} from within a second; each host adopts the list with its next catalog"
            );
            println!(
                "- the old key is in {}: destroy it once `converge-server keys status` shows every host at version {version}",
                config.signing_key.parent().unwrap_or(Path::new(".")).join("retired").display()
            );
            println!("- take the root key offline again");
        }
        KeysAction::Status { config } => {
            let (config, db) = open_db(&config)?;
            let signer = keys::read_private(&config.signing_key)?;
            let (l, _) = keys::read_key_list(&config.trusted_keys)?;
            println!("signing with {}", converge_modules::trust::key_id(&signer.verifying_key()));
            println!("key list    {}: version {}", config.trusted_keys.display(), l.version);
            for k in &l.keys {
                println!("            {} {:?}", k.id, k.role);
            }
            let versions = db.keys_versions(crate::db::now())?;
            let behind: i64 = versions.iter().filter(|(v, _)| *v != Some(l.version)).map(|(_, n)| n).sum();
            for (v, n) in &versions {
                let v = v.map_or("not said yet".to_string(), |v| format!("version {v}"));
                println!("hosts       {n} hold {v}");
            }
            if behind == 0 {
                println!("every host with a live certificate holds version {}", l.version);
            }
        }
        KeysAction::List { keys: list } => {
            let (l, _) = keys::read_key_list(&list)?;
            println!("{}: version {}", list.display(), l.version);
            for k in l.keys {
                println!("  {} {:?}", k.id, k.role);
            }
        }
    }
    Ok(0)
}
