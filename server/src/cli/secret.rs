//! `secret keygen|set|show|edit|rekey`: values in `data/secrets/` (see [`crate::secrets`]).
//! A value is read from standard input or an editor, never from an argument list.

use super::*;
use crate::secrets::{self, SecretsFile};
use clap::Subcommand;
use std::io::{Read, Write};

#[derive(Debug, Subcommand)]
pub enum SecretAction {
    /// Make an age key (an identity) for reading secrets; prints its recipient, to add to
    /// data/secrets/recipients.
    Keygen {
        /// Where to write the key (mode 0600; never overwritten).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Set a secret from standard input (one trailing newline dropped), encrypted to every
    /// recipient.
    Set {
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// The data level it belongs to: common, role/NAME, node/NAME...
        #[arg(long, default_value = "common")]
        level: String,
        name: String,
    },
    /// Print a secret's value.
    Show(Opened),
    /// Change a secret in $EDITOR (the value sits in a private file under /dev/shm meanwhile).
    Edit(Opened),
    /// Encrypt every secret again to the recipients listed now (after adding or removing one).
    Rekey {
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        #[arg(long, value_name = "FILE", env = "CONVERGE_SECRETS_IDENTITY")]
        identity: PathBuf,
    },
}

/// A secret to open with the operator's key.
#[derive(Debug, clap::Args)]
pub struct Opened {
    #[arg(long, value_name = "DIR")]
    repo: PathBuf,
    /// The data level it belongs to: common, role/NAME, node/NAME...
    #[arg(long, default_value = "common")]
    level: String,
    /// Your age key [$CONVERGE_SECRETS_IDENTITY].
    #[arg(long, value_name = "FILE", env = "CONVERGE_SECRETS_IDENTITY")]
    identity: PathBuf,
    name: String,
}

pub fn secret_command(action: SecretAction) -> Result<u8> {
    match action {
        SecretAction::Keygen { out } => {
            let (text, recipient) = secrets::generate();
            crate::keys::create(&out, &text, 0o600)?;
            println!("{recipient}");
            eprintln!(
                "wrote {}; add its recipient above to data/secrets/recipients, then `secret rekey`",
                out.display()
            );
            Ok(0)
        }
        SecretAction::Set { repo, level, name } => {
            let mut value = Vec::new();
            std::io::stdin()
                .take(secrets::MAX_VALUE as u64 + 2)
                .read_to_end(&mut value)
                .context("cannot read the value from standard input")?;
            if value.last() == Some(&b'\n') {
                value.pop();
            }
            set(&repo, &level, &name, &value)?;
            eprintln!("set {name} in {}/{level}.yaml", secrets::DIR);
            Ok(0)
        }
        SecretAction::Show(Opened { repo, level, identity, name }) => {
            let value = open(&repo, &level, &name, &identity)?;
            std::io::stdout().write_all(&value)?;
            Ok(0)
        }
        SecretAction::Edit(Opened { repo, level, identity, name }) => {
            let old = match open(&repo, &level, &name, &identity) {
                Ok(v) => v,
                Err(_) if !SecretsFile::read(&secrets::level_path(&repo, &level)?)?.values.contains_key(&name) => {
                    Vec::new()
                }
                Err(e) => return Err(e),
            };
            let shm = Path::new("/dev/shm");
            let mut tmp =
                if shm.is_dir() { tempfile::NamedTempFile::new_in(shm) } else { tempfile::NamedTempFile::new() }?;
            tmp.write_all(&old)?;
            tmp.flush()?;
            let editor = std::env::var("VISUAL").or_else(|_| std::env::var("EDITOR")).unwrap_or_else(|_| "vi".into());
            let status = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("{editor} \"$1\""))
                .arg("sh")
                .arg(tmp.path())
                .status()
                .with_context(|| format!("cannot run the editor `{editor}`"))?;
            if !status.success() {
                bail!("the editor exited with {status}: nothing was changed");
            }
            let mut value = std::fs::read(tmp.path())?;
            if value.last() == Some(&b'\n') {
                value.pop();
            }
            if value == old {
                eprintln!("{name} unchanged");
                return Ok(0);
            }
            set(&repo, &level, &name, &value)?;
            eprintln!("set {name} in {}/{level}.yaml", secrets::DIR);
            Ok(0)
        }
        SecretAction::Rekey { repo, identity } => {
            let recipients = secrets::recipients(&repo)?;
            let ids = secrets::identities(&identity)?;
            let files = secrets::all_files(&repo)?;
            // Everything is opened first: a value the key cannot open stops the rekey before
            // any file changes.
            let mut opened = Vec::new();
            for path in files.iter().filter(|p| !p.ends_with(secrets::RECIPIENTS)) {
                let file = SecretsFile::read(path)?;
                let mut values = Vec::new();
                for (name, armored) in &file.values {
                    let v = secrets::decrypt(armored, &ids)
                        .map_err(|e| anyhow::anyhow!("{}: {name}: {e}", path.display()))?;
                    values.push((name.clone(), v));
                }
                opened.push((path.clone(), values));
            }
            let mut n = 0;
            for (path, values) in opened {
                let mut file = SecretsFile::default();
                for (name, v) in values {
                    file.values.insert(name, secrets::encrypt(&v, &recipients)?);
                    n += 1;
                }
                file.write(&path)?;
            }
            println!(
                "{n} secret{} encrypted again to {} recipient{}",
                if n == 1 { "" } else { "s" },
                recipients.len(),
                if recipients.len() == 1 { "" } else { "s" }
            );
            Ok(0)
        }
    }
}

fn set(repo: &Path, level: &str, name: &str, value: &[u8]) -> Result<()> {
    if !secrets::valid_name(name) {
        bail!(
            "`{name}` cannot name a secret: letters, digits and `_`, not starting with a digit (templates read it as secrets.{name})"
        );
    }
    let recipients = secrets::recipients(repo)?;
    let path = secrets::level_path(repo, level)?;
    let mut file = SecretsFile::read(&path)?;
    file.values.insert(name.to_string(), secrets::encrypt(value, &recipients)?);
    file.write(&path)
}

fn open(repo: &Path, level: &str, name: &str, identity: &Path) -> Result<Vec<u8>> {
    let path = secrets::level_path(repo, level)?;
    let file = SecretsFile::read(&path)?;
    let armored = file.values.get(name).ok_or_else(|| anyhow::anyhow!("no secret `{name}` in {}", path.display()))?;
    let ids = secrets::identities(identity)?;
    secrets::decrypt(armored, &ids).map_err(|e| anyhow::anyhow!("{}: {name}: {e}", path.display()))
}
