//! `/bootstrap.sh` and `/packages/`: how a new machine joins with one line and no trust on
//! first use.
//!
//! The operator runs what `init` printed ([`join_command`]). curl accepts the server only if its
//! public key is the pinned one (`--insecure` only skips the chain, which the machine cannot
//! check yet); downloading before running means a refused or cut download runs nothing and
//! fails, where `curl | sh` would run nothing and succeed. The script carries the CA hash and
//! the SHA-256 of every agent package the server offers; it downloads the package for the
//! machine's system and architecture the same pinned way, checks the hash, installs it, runs
//! `converge bootstrap` with the pinned CA, and starts the agent.

use anyhow::{Context, Result};
use converge_modules::hash::sha256_hex;
use std::path::Path;

/// An agent package in the state directory's `packages/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    /// `deb` or `rpm`.
    pub kind: &'static str,
    /// As the system names it: `amd64` (dpkg) or `x86_64` (rpm).
    pub arch: String,
    pub file: String,
    pub sha256: String,
}

/// The public-key pin of the server certificate: `sha256//` and the base64 SHA-256 of its
/// SubjectPublicKeyInfo, as `curl --pinnedpubkey` takes it.
pub fn pin(state: &Path) -> Result<String> {
    use base64ct::Encoding;
    let pem = std::fs::read_to_string(state.join("server.key"))
        .with_context(|| format!("cannot read {}/server.key", state.display()))?;
    let key = rcgen::KeyPair::from_pem(&pem).map_err(|e| anyhow::anyhow!("{}/server.key: {e}", state.display()))?;
    let digest = <sha2::Sha256 as sha2::Digest>::digest(rcgen::PublicKeyData::subject_public_key_info(&key));
    Ok(format!("sha256//{}", base64ct::Base64::encode_string(&digest)))
}

/// Whether `name` may be served from `packages/`: a plain file name.
pub fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+' | '~'))
}

/// The agent packages in `dir`: `converge_VERSION_ARCH.deb` and `converge-VERSION-REL.ARCH.rpm`.
pub fn packages(dir: &Path) -> Vec<Package> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    let mut names: Vec<String> = entries.flatten().filter_map(|e| e.file_name().into_string().ok()).collect();
    names.sort();
    for file in names.into_iter().filter(|n| safe_name(n)) {
        let parsed = if let Some(rest) = file.strip_prefix("converge_").and_then(|r| r.strip_suffix(".deb")) {
            rest.rsplit_once('_').map(|(_, arch)| ("deb", arch.to_string()))
        } else if let Some(rest) =
            file.strip_prefix("converge-").filter(|r| !r.starts_with("server")).and_then(|r| r.strip_suffix(".rpm"))
        {
            rest.rsplit_once('.').map(|(_, arch)| ("rpm", arch.to_string()))
        } else {
            None
        };
        let Some((kind, arch)) = parsed else { continue };
        let Ok(bytes) = std::fs::read(dir.join(&file)) else { continue };
        out.push(Package { kind, arch, sha256: sha256_hex(&bytes), file });
    }
    out
}

/// The line that joins a new machine to the server at `url` (`https://HOST:PORT`), run as root:
/// the script fetched with the server's key pinned, then run with `token`.
pub fn join_command(url: &str, pin: &str, token: &str) -> String {
    format!(
        "curl -fsS --insecure --pinnedpubkey {pin} -o bootstrap.sh {url}/bootstrap.sh && sh bootstrap.sh --token {token}"
    )
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script for `server` (its URL as the machine reached it). Pure.
pub fn script(server: &str, ca_hash: &str, pin: &str, packages: &[Package]) -> String {
    let mut choose = String::new();
    for p in packages {
        choose.push_str(&format!("    {}:{}) file={}; sum={} ;;\n", p.kind, p.arch, quote(&p.file), quote(&p.sha256)));
    }
    format!(
        r#"#!/bin/sh
# converge bootstrap, served by the converge server at {server}.
# Run it as root, fetched with the server's key pinned:
#   {join} [--name NAME]
# It installs the agent package (checked against the hash below), joins this machine to the
# server with its CA pinned, and starts the agent.
set -eu
SERVER={server_q}
CA_HASH={ca_q}
PIN={pin_q}
fail() {{ echo "converge bootstrap: $*" >&2; exit 1; }}
[ "$(id -u)" = 0 ] || fail "run it as root (sudo sh bootstrap.sh --token TOKEN)"
if command -v dpkg >/dev/null 2>&1; then
    kind=deb; arch="$(dpkg --print-architecture)"
elif command -v rpm >/dev/null 2>&1; then
    kind=rpm; arch="$(uname -m)"
else
    fail "this machine has neither dpkg nor rpm"
fi
file=; sum=
case "$kind:$arch" in
{choose}    *) fail "the server offers no agent package for $kind on $arch: copy one into its state directory's packages/ (packaging/build makes them)" ;;
esac
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
chmod 0755 "$tmp" # apt reads the package as its own user
curl -fsS --insecure --pinnedpubkey "$PIN" -o "$tmp/$file" "$SERVER/packages/$file" ||
    fail "cannot download $SERVER/packages/$file"
echo "$sum  $tmp/$file" | sha256sum -c --quiet - >/dev/null 2>&1 ||
    fail "$file does not match the hash this script carries: not installing it"
# Through apt or dnf, which wait for a package lock held by a first boot's own updates.
case "$kind" in
    deb) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 "$tmp/$file" >/dev/null ||
        fail "cannot install $file (above: what apt said)" ;;
    rpm) if command -v dnf >/dev/null 2>&1; then dnf install -y -q "$tmp/$file"; else rpm -U --replacepkgs "$tmp/$file"; fi ||
        fail "cannot install $file (above: what the package manager said)" ;;
esac
status=0
converge bootstrap --server "$SERVER" --ca-hash "$CA_HASH" "$@" || status=$?
[ -f /etc/converge/agent.toml ] || fail "this machine did not join (converge bootstrap exited $status: above, why)"
# Joined: the agent runs from now on, even if its first run had failures (it retries each run).
if [ -d /run/systemd/system ]; then
    systemctl enable --now converge.service
    echo "converge bootstrap: the agent runs (systemctl status converge)"
fi
if [ "$status" != 0 ]; then
    echo "converge bootstrap: joined, but the first run had failures (above; converge status shows them again)" >&2
fi
"#,
        join = join_command(server, pin, "TOKEN"),
        server_q = quote(server),
        ca_q = quote(ca_hash),
        pin_q = quote(pin),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_are_found_by_name_and_hashed() {
        let t = tempfile::tempdir().unwrap();
        for f in [
            "converge_0.1.0_amd64.deb",
            "converge-server_0.1.0_amd64.deb",
            "converge-0.1.0-1.x86_64.rpm",
            "converge-server-0.1.0-1.x86_64.rpm",
            "notes.txt",
        ] {
            std::fs::write(t.path().join(f), f).unwrap();
        }
        let p = packages(t.path());
        let kinds: Vec<(&str, &str, &str)> = p.iter().map(|p| (p.kind, p.arch.as_str(), p.file.as_str())).collect();
        assert_eq!(
            kinds,
            vec![("rpm", "x86_64", "converge-0.1.0-1.x86_64.rpm"), ("deb", "amd64", "converge_0.1.0_amd64.deb")]
        );
        assert_eq!(p[1].sha256, sha256_hex(b"converge_0.1.0_amd64.deb"));
        assert!(
            !safe_name("../x") && !safe_name(".hidden") && !safe_name("a/b") && safe_name("converge_0.1.0_amd64.deb")
        );
    }

    #[test]
    fn the_script_carries_its_pins_and_hashes() {
        let p =
            Package { kind: "deb", arch: "amd64".into(), file: "converge_0.1.0_amd64.deb".into(), sha256: "ab".into() };
        let s = script("https://10.0.0.1:8443", "sha256:cafe", "sha256//PIN=", &[p]);
        assert!(s.contains("SERVER='https://10.0.0.1:8443'\nCA_HASH='sha256:cafe'\nPIN='sha256//PIN='\n"), "{s}");
        assert!(s.contains("    deb:amd64) file='converge_0.1.0_amd64.deb'; sum='ab' ;;\n"), "{s}");
        assert!(s.contains("--pinnedpubkey \"$PIN\""), "{s}");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}
