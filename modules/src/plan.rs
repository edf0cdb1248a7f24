//! The plan: in which order to converge resources, what each depends on, and whom it notifies.
//!
//! Edges come from `requires`, from `notify` (the target comes after the notifier), and are
//! implied between a path and its nearest managed ancestor directory. The order is a stable
//! topological sort: among resources free to go, the one declared first goes first. Pure.

use crate::catalog::{DirectorySpec, Ensure, FileSpec, Kind, Resource, ResourceId, Spec, parent_path as parent};
use crate::validate::Problem;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

/// Why one resource comes after another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// It `requires` the other.
    Requires,
    /// The other `notify`s it.
    NotifiedBy,
    /// It lies inside the other, a managed directory.
    Inside,
    /// Both are absent and the other lies inside it: children go first.
    Contains,
    /// It is owned by the other (a user or group).
    OwnedBy,
    /// It is a member of the other (a group).
    MemberOf,
    /// It is a service and the other its package.
    PackageOf,
    /// It writes into the file the other declares (a `line` in a `file`).
    Edits,
    /// It is a package and the other a repository.
    FromRepository,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Resource indexes in the order to converge them.
    pub order: Vec<usize>,
    /// For each resource, those that must be converged (successfully) before it.
    pub deps: Vec<Vec<(usize, Why)>>,
    /// For each resource, those it refreshes when it changes.
    pub notify: Vec<Vec<usize>>,
}

/// Builds the plan, or every problem found: a path declared as two kinds, a path inside a file
/// or inside an absent directory, a relation to an undeclared resource, a cycle.
pub fn plan(resources: &[Resource]) -> Result<Plan, Vec<Problem>> {
    plan_partial(resources, &HashSet::new())
}

/// [`plan`], for a catalog of which some resources could not be read: relations to the ids in
/// `unreadable` are not reported as undeclared (their own problem already is).
pub fn plan_partial(resources: &[Resource], unreadable: &HashSet<ResourceId>) -> Result<Plan, Vec<Problem>> {
    let n = resources.len();
    let mut problems = Vec::new();
    let ids: HashMap<&ResourceId, usize> = resources.iter().enumerate().map(|(i, r)| (&r.id, i)).collect();
    let mut deps: Vec<Vec<(usize, Why)>> = vec![Vec::new(); n];
    let mut notify: Vec<Vec<usize>> = vec![Vec::new(); n];

    // One namespace of paths.
    let mut paths: HashMap<&str, usize> = HashMap::with_capacity(n);
    for (i, r) in resources.iter().enumerate() {
        let Some(path) = r.path() else { continue };
        if let Some(&j) = paths.get(path) {
            problems.push(Problem {
                at: i,
                also: vec![j],
                message: format!("path {path} is declared as {} and as {}", resources[j].id.kind, r.id.kind),
            });
        } else {
            paths.insert(path, i);
        }
    }
    for (i, r) in resources.iter().enumerate() {
        let Some(path) = r.path() else { continue };
        let mut up = parent(path);
        while let Some(p) = up {
            if let Some(&j) = paths.get(p) {
                let a = &resources[j];
                let (outer_present, inner_present) =
                    (a.spec.ensure() == Ensure::Present, r.spec.ensure() == Ensure::Present);
                match (a.id.kind, outer_present, inner_present) {
                    (Kind::Directory, true, _) => deps[i].push((j, Why::Inside)),
                    (Kind::Directory, false, false) => deps[j].push((i, Why::Contains)),
                    (Kind::Directory, false, true) => problems.push(Problem {
                        at: i,
                        also: vec![j],
                        message: format!("{} is inside {}, which is `ensure: absent`", r.id, a.id),
                    }),
                    (_, _, true) => problems.push(Problem {
                        at: i,
                        also: vec![j],
                        message: format!("{} is inside {}, which is not a directory", r.id, a.id),
                    }),
                    (_, _, false) => {}
                }
                break;
            }
            up = parent(p);
        }
    }

    // Files written by resources that do not own them: after the file's own resource (which
    // may not also declare its whole content) and after the directory holding it.
    for (i, r) in resources.iter().enumerate() {
        for written in r.writes() {
            if let Some(&j) = paths.get(written.as_ref()) {
                let f = &resources[j];
                match &f.spec {
                    Spec::File(FileSpec { content: None, source: None, .. }) if f.spec.ensure() == Ensure::Present => {
                        deps[i].push((j, Why::Edits))
                    }
                    Spec::File(_) if f.spec.ensure() == Ensure::Absent => problems.push(Problem {
                        at: i,
                        also: vec![j],
                        message: format!("{} writes into {written}, which {} declares `ensure: absent`", r.id, f.id),
                    }),
                    Spec::File(_) => problems.push(Problem {
                        at: i,
                        also: vec![j],
                        message: format!(
                            "{} edits {written}, whose whole content {} declares: put the edit into that content, or \
                         leave `content` out of {} (it may still manage the mode and owner)",
                            r.id, f.id, f.id
                        ),
                    }),
                    _ => problems.push(Problem {
                        at: i,
                        also: vec![j],
                        message: format!("{} writes into {written}, which is declared as a {}", r.id, f.id.kind),
                    }),
                }
                continue;
            }
            let mut up = parent(&written);
            while let Some(p) = up {
                if let Some(&j) = paths.get(p) {
                    let a = &resources[j];
                    match (a.id.kind, a.spec.ensure()) {
                        (Kind::Directory, Ensure::Present) => deps[i].push((j, Why::Inside)),
                        _ if r.spec.ensure() == Ensure::Absent => {}
                        (Kind::Directory, Ensure::Absent) => problems.push(Problem {
                            at: i,
                            also: vec![j],
                            message: format!(
                                "{} writes into {written}, inside {}, which is `ensure: absent`",
                                r.id, a.id
                            ),
                        }),
                        _ => problems.push(Problem {
                            at: i,
                            also: vec![j],
                            message: format!(
                                "{} writes into {written}, inside {}, which is not a directory",
                                r.id, a.id
                            ),
                        }),
                    }
                    break;
                }
                up = parent(p);
            }
        }
    }

    // Accounts and packages a resource uses, when the catalog manages them.
    let repositories: Vec<&str> = resources
        .iter()
        .filter(|r| matches!(r.spec, Spec::Repository(_)) && r.spec.ensure() == Ensure::Present)
        .map(|r| r.id.title.as_str())
        .collect();
    let implied = |kind: Kind, title: &str| ids.get(&ResourceId { kind, title: title.to_string() }).copied();
    for (i, r) in resources.iter().enumerate() {
        let mut need = |kind: Kind, title: &str, why: Why| {
            if let Some(j) = implied(kind, title)
                && j != i
            {
                deps[i].push((j, why));
            }
        };
        match &r.spec {
            Spec::File(FileSpec { owner, group, .. }) | Spec::Directory(DirectorySpec { owner, group, .. }) => {
                owner.iter().for_each(|o| need(Kind::User, o, Why::OwnedBy));
                group.iter().for_each(|g| need(Kind::Group, g, Why::OwnedBy));
            }
            Spec::User(u) => {
                u.gid.iter().chain(u.groups.iter().flatten()).for_each(|g| need(Kind::Group, g, Why::MemberOf));
            }
            Spec::Service(_) => need(Kind::Package, &r.id.title, Why::PackageOf),
            Spec::Timer(t) => t.user.iter().for_each(|u| need(Kind::User, u, Why::OwnedBy)),
            Spec::Mount(_) => need(Kind::Directory, &r.id.title, Why::Inside),
            // Packages come from the repositories: after every one of them.
            Spec::Package(_) => {
                for repo in &repositories {
                    need(Kind::Repository, repo, Why::FromRepository);
                }
            }
            _ => {}
        }
    }

    // Declared relations.
    for (i, r) in resources.iter().enumerate() {
        for (list, verb) in [(&r.meta.requires, "requires"), (&r.meta.notify, "notifies")] {
            for target in list {
                let Some(&j) = ids.get(target) else {
                    if unreadable.contains(target) {
                        continue;
                    }
                    problems.push(Problem::new(i, undeclared(&r.id, verb, target, resources)));
                    continue;
                };
                if verb == "requires" {
                    deps[i].push((j, Why::Requires));
                } else {
                    deps[j].push((i, Why::NotifiedBy));
                    if !notify[i].contains(&j) {
                        notify[i].push(j);
                    }
                }
            }
        }
    }
    for d in &mut deps {
        let mut seen = Vec::with_capacity(d.len());
        d.retain(|(j, _)| {
            let new = !seen.contains(j);
            seen.push(*j);
            new
        });
    }

    // Stable topological order.
    let mut indegree: Vec<usize> = deps.iter().map(Vec::len).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, d) in deps.iter().enumerate() {
        for &(j, _) in d {
            dependents[j].push(i);
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> = (0..n).filter(|&i| indegree[i] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for &k in &dependents[i] {
            indegree[k] -= 1;
            if indegree[k] == 0 {
                ready.push(Reverse(k));
            }
        }
    }
    if order.len() < n {
        problems.push(cycle(resources, &deps, &indegree));
    }
    if problems.is_empty() { Ok(Plan { order, deps, notify }) } else { Err(problems) }
}

fn undeclared(from: &ResourceId, verb: &str, target: &ResourceId, resources: &[Resource]) -> String {
    // Paths share one namespace, so another kind at the same path is likely what was meant.
    let same_title =
        resources.iter().find(|r| r.id.title == target.title && r.id.kind.is_path() && target.kind.is_path());
    match same_title {
        Some(r) => format!("{from} {verb} {target}, which is not declared (did you mean {}?)", r.id),
        None => format!("{from} {verb} {target}, which is not declared"),
    }
}

/// Finds one cycle among the resources left unordered and describes it.
fn cycle(resources: &[Resource], deps: &[Vec<(usize, Why)>], left: &[usize]) -> Problem {
    // Every resource left has a dependency that is also left, so walking those must revisit one.
    let start = (0..left.len()).find(|&i| left[i] > 0).expect("a resource is left");
    let mut path = vec![start];
    let mut whys = Vec::new();
    loop {
        let v = *path.last().unwrap();
        let &(next, why) = deps[v].iter().find(|(j, _)| left[*j] > 0).expect("a left resource has a left dependency");
        whys.push(why);
        if let Some(pos) = path.iter().position(|&x| x == next) {
            let members: Vec<usize> = path[pos..].to_vec();
            let whys = &whys[pos..];
            let steps: Vec<String> = members
                .iter()
                .zip(whys)
                .enumerate()
                .map(|(k, (&m, why))| {
                    let other = &resources[members[(k + 1) % members.len()]].id;
                    let this = &resources[m].id;
                    match why {
                        Why::Requires => format!("{this} requires {other}"),
                        Why::NotifiedBy => format!("{this} is notified by {other}"),
                        Why::Inside => format!("{this} is inside {other}"),
                        Why::Contains => format!("{this} (absent) contains {other}"),
                        Why::OwnedBy => format!("{this} is owned by {other}"),
                        Why::MemberOf => format!("{this} is a member of {other}"),
                        Why::PackageOf => format!("{this} needs its package {other}"),
                        Why::Edits => format!("{this} edits the file {other}"),
                        Why::FromRepository => format!("{this} comes after the repository {other}"),
                    }
                })
                .collect();
            let at = *members.iter().min().unwrap();
            let also = members.iter().copied().filter(|&m| m != at).collect();
            return Problem { at, also, message: format!("dependency cycle: {}", steps.join(", ")) };
        }
        path.push(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{DirectorySpec, ExecSpec, FileSpec, LineSpec, Meta, Spec, SymlinkSpec};

    fn r(id: &str, requires: &[&str], notify: &[&str]) -> Resource {
        let id = ResourceId::parse(id).unwrap();
        let meta = Meta {
            requires: requires.iter().map(|s| ResourceId::parse(s).unwrap()).collect(),
            notify: notify.iter().map(|s| ResourceId::parse(s).unwrap()).collect(),
            sensitive: None,
            confirm: None,
        };
        let spec = match id.kind {
            Kind::File => Spec::File(FileSpec::default()),
            Kind::Directory => Spec::Directory(DirectorySpec::default()),
            Kind::Symlink => Spec::Symlink(SymlinkSpec { target: Some("/x".into()), ..Default::default() }),
            Kind::Package => Spec::Package(Default::default()),
            Kind::User => Spec::User(Default::default()),
            Kind::Group => Spec::Group(Default::default()),
            Kind::Service => Spec::Service(Default::default()),
            Kind::Exec => Spec::Exec(ExecSpec { command: vec!["true".into()], ..Default::default() }),
            Kind::Line => Spec::Line(LineSpec { path: "/etc/f".into(), line: Some("x".into()), ..Default::default() }),
            Kind::Block => Spec::Block(Default::default()),
            Kind::Sysctl => Spec::Sysctl(Default::default()),
            Kind::Timer => Spec::Timer(Default::default()),
            Kind::Mount => Spec::Mount(Default::default()),
            Kind::Repository => Spec::Repository(Default::default()),
        };
        Resource::new(id, meta, spec)
    }

    fn absent(mut res: Resource) -> Resource {
        match &mut res.spec {
            Spec::File(s) => s.ensure = Some(Ensure::Absent),
            Spec::Directory(s) => s.ensure = Some(Ensure::Absent),
            Spec::Symlink(s) => s.ensure = Some(Ensure::Absent),
            _ => unreachable!("path kinds only"),
        }
        res
    }

    fn order(rs: &[Resource]) -> Vec<String> {
        plan(rs).unwrap().order.iter().map(|&i| rs[i].id.to_string()).collect()
    }

    #[test]
    fn ties_keep_declaration_order() {
        let rs = [r("file:/b", &[], &[]), r("file:/a", &[], &[]), r("file:/c", &[], &[])];
        assert_eq!(order(&rs), ["file:/b", "file:/a", "file:/c"]);
    }

    #[test]
    fn requires_and_notify_order_and_parents_come_first() {
        let rs = [
            r("file:/srv/app/conf", &[], &["file:/z"]),
            r("file:/z", &[], &[]),
            r("file:/y", &["file:/z"], &[]),
            r("directory:/srv", &[], &[]),
            r("directory:/srv/app", &[], &[]),
        ];
        assert_eq!(order(&rs), ["directory:/srv", "directory:/srv/app", "file:/srv/app/conf", "file:/z", "file:/y"]);
        let p = plan(&rs).unwrap();
        assert_eq!(p.notify[0], vec![1]);
        assert_eq!(p.deps[0], vec![(4, Why::Inside)], "nearest managed ancestor only");
    }

    #[test]
    fn absent_trees_remove_children_first() {
        let rs = [absent(r("directory:/a", &[], &[])), absent(r("file:/a/b", &[], &[]))];
        assert_eq!(order(&rs), ["file:/a/b", "directory:/a"]);
    }

    #[test]
    fn a_cycle_names_its_members() {
        let rs = [r("file:/ok", &[], &[]), r("file:/a", &["file:/b"], &["file:/b"]), r("file:/b", &[], &[])];
        let problems = plan(&rs).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].at, 1);
        assert_eq!(problems[0].also, vec![2]);
        assert_eq!(problems[0].message, "dependency cycle: file:/a requires file:/b, file:/b is notified by file:/a");
    }

    #[test]
    fn a_cycle_through_an_implied_edge() {
        let rs = [r("directory:/a", &["file:/a/b"], &[]), r("file:/a/b", &[], &[])];
        let problems = plan(&rs).unwrap_err();
        assert!(problems[0].message.contains("file:/a/b is inside directory:/a"), "{}", problems[0].message);
    }

    #[test]
    fn undeclared_relations_suggest_the_declared_kind() {
        let rs = [r("file:/a", &["file:/srv"], &[]), r("directory:/srv", &[], &[])];
        let problems = plan(&rs).unwrap_err();
        assert_eq!(
            problems[0].message,
            "file:/a requires file:/srv, which is not declared (did you mean directory:/srv?)"
        );
    }

    #[test]
    fn path_conflicts() {
        let rs =
            [r("file:/a", &[], &[]), r("directory:/a", &[], &[]), r("file:/f/x", &[], &[]), r("file:/f", &[], &[])];
        let msgs: Vec<String> = plan(&rs).unwrap_err().into_iter().map(|p| p.message).collect();
        assert_eq!(
            msgs,
            ["path /a is declared as file and as directory", "file:/f/x is inside file:/f, which is not a directory"]
        );
        let rs = [absent(r("directory:/d", &[], &[])), r("file:/d/x", &[], &[])];
        assert!(plan(&rs).unwrap_err()[0].message.contains("`ensure: absent`"));
    }

    #[test]
    fn files_need_their_owners_users_their_groups_services_their_packages() {
        let mut f = r("file:/home/alice/.profile", &[], &[]);
        if let Spec::File(spec) = &mut f.spec {
            spec.owner = Some("alice".into());
            spec.group = Some("staff".into());
        }
        let mut alice = r("user:alice", &[], &[]);
        if let Spec::User(u) = &mut alice.spec {
            u.groups = Some(vec!["staff".into(), "undeclared".into()]);
        }
        let rs = [f, r("service:nginx", &[], &[]), alice, r("group:staff", &[], &[]), r("package:nginx", &[], &[])];
        assert_eq!(
            order(&rs),
            ["group:staff", "user:alice", "file:/home/alice/.profile", "package:nginx", "service:nginx"]
        );
    }

    #[test]
    fn self_requirement_is_a_cycle() {
        let rs = [r("file:/a", &["file:/a"], &[])];
        assert_eq!(plan(&rs).unwrap_err()[0].message, "dependency cycle: file:/a requires file:/a");
    }
}
