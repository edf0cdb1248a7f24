//! `repository`: a package repository and its signing key, in the host package manager's own
//! files ([`super::package::PackageTool::repository_files`]): apt's deb822 `.sources` with
//! `Signed-By` naming a key of its own (never a key trusted for every repository), dnf's
//! `.repo` with `gpgcheck`.
//!
//! A changed repository is fetched at once, alone (`apt-get update` of its file,
//! `dnf makecache` of it): an address that does not answer or lists whose signature the key
//! does not verify put both files back as they were and fail the resource with the tool's
//! words, so a wrong key never leaves every later `apt-get update` of the host failing. The
//! packages of the run are converged after every repository and see what it offers.

use super::{Checked, System, fail, present};
use crate::catalog::{RepositorySpec, Resource};
use crate::host::NewAttrs;
use crate::providers::ProviderError;
use crate::report::{Change, describe_content, unified_diff};

const MAX_READ: u64 = 1 << 20;

/// Each file's current content (`None`: absent).
fn read(sys: &System, paths: &[String; 2]) -> Result<[Option<Vec<u8>>; 2], ProviderError> {
    let one = |p: &str| -> Result<Option<Vec<u8>>, ProviderError> {
        Ok(sys.host.read_file(p, MAX_READ).map_err(fail)?.map(|r| r.content.unwrap_or_default()))
    };
    Ok([one(&paths[0])?, one(&paths[1])?])
}

pub fn check(sys: &System, r: &Resource, spec: &RepositorySpec) -> Result<(Checked, Vec<Change>), ProviderError> {
    let tool = sys.package_tool()?;
    let name = r.id.title.as_str();
    let paths = tool.repository_paths(name);
    let have = read(sys, &paths)?;
    let mut changes = Vec::new();
    if !present(r) {
        if have.iter().any(Option::is_some) {
            changes.push(Change::new("ensure", "present", "absent"));
        }
        return Ok((Checked::default(), changes));
    }
    let want = tool.repository_files(name, spec);
    if have[0].as_deref() != Some(want[0].as_bytes()) {
        let from = have[0].as_deref().map_or("absent".into(), describe_content);
        changes.push(Change::new("key", from, describe_content(want[0].as_bytes())));
    }
    if have[1].as_deref() != Some(want[1].as_bytes()) {
        let old = have[1].as_deref().unwrap_or_default();
        let mut c = Change::new("definition", if have[1].is_some() { "different" } else { "absent" }, "as declared");
        c.diff = unified_diff(&paths[1], &format!("{} ({})", paths[1], r.id), old, want[1].as_bytes());
        changes.push(c);
    }
    Ok((Checked::default(), changes))
}

/// Writes (or removes) `files` as they are given; `None` removes.
fn put(sys: &System, paths: &[String; 2], files: &[Option<Vec<u8>>; 2]) -> Result<(), ProviderError> {
    let attrs = NewAttrs { mode: 0o644, uid: Some(0), gid: Some(0) };
    for (path, content) in paths.iter().zip(files) {
        let exists = sys.host.stat(path).map_err(fail)?.is_some();
        match content {
            Some(c) => sys.host.write_file(path, c, attrs, None).map_err(super::fail_create)?,
            None if exists => sys.host.remove(path).map_err(fail)?,
            None => {}
        }
    }
    Ok(())
}

pub fn apply(sys: &System, r: &Resource, spec: &RepositorySpec) -> Result<(), ProviderError> {
    let tool = sys.package_tool()?;
    let name = r.id.title.as_str();
    let paths = tool.repository_paths(name);
    let old = read(sys, &paths)?;
    // The package lists change with it: the run's packages ask again.
    sys.run.borrow_mut().available = None;
    if !present(r) {
        return put(sys, &paths, &[None, None]);
    }
    // apt's keyrings directory is made by apt since Debian 12; older systems lack it.
    if let Some(dir) = crate::catalog::parent_path(&paths[0])
        && sys.host.stat(dir).map_err(fail)?.is_none()
    {
        sys.host.mkdir(dir, NewAttrs { mode: 0o755, uid: Some(0), gid: Some(0) }).map_err(super::fail_create)?;
    }
    let want = tool.repository_files(name, spec).map(|c| Some(c.into_bytes()));
    put(sys, &paths, &want)?;
    if spec.enabled == Some(false) {
        return Ok(());
    }
    if let Err(e) = tool.refresh_repository(sys.host, name, &sys.tools) {
        put(sys, &paths, &old)?;
        return Err(format!(
            "repository {name} was refused, its files put back as they were (check its url and key): {e}"
        )
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::host::memory::MemHost;
    use crate::providers::converge_yaml;
    use crate::report::Status;

    const KEY: &str = "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmDMEZ\n-----END PGP PUBLIC KEY BLOCK-----\n";

    fn repo() -> String {
        format!(
            "  - repository: example\n    url: https://deb.example.com/debian\n    suites: [bookworm]\n    components: [main]\n    key: |\n{}  - package: example-tool\n",
            KEY.lines().map(|l| format!("      {l}\n")).collect::<String>()
        )
    }

    fn debian() -> MemHost {
        MemHost::new()
            .with_dir("/etc", 0o755)
            .with_file("/etc/os-release", "ID=debian\n", 0o644)
            .with_dir("/etc/apt", 0o755)
            .with_dir("/etc/apt/sources.list.d", 0o755)
            .with_available("example-tool", &["1.0"])
    }

    #[test]
    fn written_fetched_alone_then_nothing() {
        let host = debian();
        let events = converge_yaml(&host, &repo(), false);
        assert_eq!(events[0].status, Status::Changed, "{events:?}");
        let sources = host.content("/etc/apt/sources.list.d/converge-example.sources").unwrap();
        assert!(sources.contains("URIs: https://deb.example.com/debian\nSuites: bookworm\nComponents: main\nSigned-By: /etc/apt/keyrings/converge-example.asc\n"), "{sources}");
        assert_eq!(host.content("/etc/apt/keyrings/converge-example.asc").as_deref(), Some(KEY));
        let fetched = host.processes().into_iter().find(|p| p.starts_with("apt-get update")).unwrap();
        assert!(fetched.contains("Dir::Etc::SourceList=/etc/apt/sources.list.d/converge-example.sources"), "{fetched}");
        assert!(converge_yaml(&host, &repo(), false).iter().all(|e| e.status == Status::Unchanged));
    }

    #[test]
    fn a_repository_its_tool_refuses_is_put_back() {
        let host = debian().refuse_repositories();
        let e = converge_yaml(&host, &repo(), false).remove(0);
        assert_eq!(e.status, Status::Failed);
        assert!(e.message.unwrap().starts_with("repository example was refused, its files put back as they were"));
        assert_eq!(host.content("/etc/apt/sources.list.d/converge-example.sources"), None);
        assert_eq!(host.content("/etc/apt/keyrings/converge-example.asc"), None);
    }

    #[test]
    fn a_dnf_host_gets_a_repo_file_with_gpgcheck() {
        let host = MemHost::new()
            .with_dir("/etc", 0o755)
            .with_file("/etc/os-release", "ID=rocky\nID_LIKE=\"rhel centos fedora\"\n", 0o644)
            .with_dir("/etc/yum.repos.d", 0o755)
            .with_dir("/etc/pki", 0o755);
        let yaml = repo().replace("  - package: example-tool\n", "");
        let e = converge_yaml(&host, &yaml, false).remove(0);
        assert_eq!(e.status, Status::Changed, "{e:?}");
        let repo = host.content("/etc/yum.repos.d/converge-example.repo").unwrap();
        assert!(repo.contains("[converge-example]\nname=example\nbaseurl=https://deb.example.com/debian\nenabled=1\ngpgcheck=1\ngpgkey=file:///etc/pki/rpm-gpg/RPM-GPG-KEY-converge-example\n"), "{repo}");
        assert!(host.processes().iter().any(|p| p.contains("makecache --disablerepo=* --enablerepo=converge-example")));
    }
}
