//! Which pod and container a process is in, from its cgroup: the kubelet
//! puts every container of a pod under a cgroup named after the pod's UID
//! (`…/pod<UID>/<container>` with the cgroupfs driver,
//! `…/kubepods-<qos>-pod<UID with _>.slice/cri-containerd-<container>.scope`
//! with systemd's), host-network pods included, whose address is the node's.
//!
//! The kernel sends the process (tgid) and its cgroup v2 id; the process's
//! `/proc/PID/cgroup` says the path, read while the process is known to be
//! alive (its connection was just named), and the path's directory on the
//! cgroup v2 mount is checked to be that id where it can be seen (a PID
//! reused meanwhile names another cgroup). Results are kept per cgroup id:
//! one read per container, not per connection.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

/// What a process's cgroup says of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A container of the pod with this UID.
    Pod {
        uid: Arc<str>,
        container: Option<Arc<str>>,
    },
    /// A process of the node itself, in no pod.
    Node,
}

/// Why a process's cgroup could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unread {
    /// The agent does not see the node's processes by their PIDs (it is
    /// not in the host's PID namespace: `hostPID`).
    NoHostPids,
    /// The process was gone, or its PID was another's by then.
    Gone,
}

/// The pod UID and container ID a `/proc/PID/cgroup` names, and its cgroup
/// v2 path (the `0::` line).
pub fn parse(text: &str) -> (Origin, Option<&str>) {
    let mut uid = None;
    let mut container = None;
    let mut v2 = None;
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(hierarchy), Some(_), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if hierarchy == "0" {
            v2 = Some(path);
        }
        if uid.is_none()
            && let Some((u, c)) = pod_of(path)
        {
            uid = Some(u);
            container = c;
        }
    }
    let origin = match uid {
        Some(uid) => Origin::Pod {
            uid: uid.into(),
            container: container.map(Into::into),
        },
        None => Origin::Node,
    };
    (origin, v2)
}

/// The pod UID in a cgroup path, and the container ID after it.
fn pod_of(path: &str) -> Option<(String, Option<String>)> {
    let parts: Vec<&str> = path.split('/').collect();
    let at = parts.iter().rposition(|p| pod_uid(p).is_some())?;
    let uid = pod_uid(parts[at])?;
    let container = parts.get(at + 1).and_then(|p| container_id(p));
    Some((uid, container))
}

/// `pod<UID>` (cgroupfs) or `kubepods[-<qos>]-pod<UID with _>.slice`
/// (systemd).
fn pod_uid(part: &str) -> Option<String> {
    let raw = if let Some(slice) = part.strip_suffix(".slice") {
        slice.rsplit_once("-pod")?.1.replace('_', "-")
    } else {
        part.strip_prefix("pod")?.to_owned()
    };
    is_uid(&raw).then_some(raw)
}

/// A UUID as the API server writes `metadata.uid`.
fn is_uid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// `<64 hex>`, or it wrapped by the runtime's scope
/// (`cri-containerd-…scope`, `crio-…scope`, `docker-…scope`).
fn container_id(part: &str) -> Option<String> {
    let id = part.strip_suffix(".scope").unwrap_or(part);
    let id = id.rsplit_once('-').map_or(id, |(_, id)| id);
    (id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit())).then(|| id.to_owned())
}

/// The init PID namespace's inode number (`PROC_PID_INIT_INO`): PIDs the
/// kernel reports are the ones `/proc` shows only from there.
const INIT_PID_NS: u64 = 0xEFFF_FFFC;

/// Origins known, at most this many (then started again).
const MAX_KNOWN: usize = 16 * 1024;

/// Cgroup ids to origins, read from `/proc`.
pub struct Cgroups {
    proc: PathBuf,
    /// Where cgroup v2 is mounted, seen from here (to check an id).
    v2: Option<PathBuf>,
    host_pids: bool,
    known: crate::FastMap<u64, Origin>,
}

impl Cgroups {
    /// Reads processes under `proc` (`/proc`).
    pub fn new(proc: &Path) -> Self {
        let host_pids =
            std::fs::metadata(proc.join("self/ns/pid")).is_ok_and(|m| m.ino() == INIT_PID_NS);
        Self {
            proc: proc.to_owned(),
            v2: v2_mount(proc),
            host_pids,
            known: Default::default(),
        }
    }

    /// Whether processes can be read at all (see [`Unread::NoHostPids`]).
    pub fn host_pids(&self) -> bool {
        self.host_pids
    }

    /// The origin of process `tgid`, in cgroup `id`.
    pub fn origin(&mut self, id: u64, tgid: u32) -> Result<Origin, Unread> {
        if let Some(o) = self.known.get(&id) {
            return Ok(o.clone());
        }
        if !self.host_pids {
            return Err(Unread::NoHostPids);
        }
        let text = std::fs::read_to_string(self.proc.join(tgid.to_string()).join("cgroup"))
            .map_err(|_| Unread::Gone)?;
        let (origin, path) = parse(&text);
        // Where the path can be seen, it must be the kernel's cgroup: else
        // the PID is another process's by now.
        if let (Some(v2), Some(path)) = (&self.v2, path)
            && let Ok(m) = std::fs::metadata(v2.join(path.trim_start_matches('/')))
            && m.ino() != id
        {
            return Err(Unread::Gone);
        }
        if self.known.len() >= MAX_KNOWN {
            self.known.clear();
        }
        self.known.insert(id, origin.clone());
        Ok(origin)
    }
}

/// Where cgroup v2 is mounted: the node's mount (through PID 1's root,
/// with hostPID) or the agent's own.
fn v2_mount(proc: &Path) -> Option<PathBuf> {
    let pid1 = proc.join("1");
    let node = std::fs::read_to_string(pid1.join("mountinfo"))
        .ok()
        .and_then(|m| cgroup2_in(&m).map(|at| pid1.join("root").join(at.trim_start_matches('/'))))
        .filter(|p| p.is_dir());
    node.or_else(|| {
        std::fs::read_to_string(proc.join("self/mountinfo"))
            .ok()
            .and_then(|m| cgroup2_in(&m).map(PathBuf::from))
    })
}

/// The mount point of the first cgroup2 mount of a `mountinfo` whose root
/// is the hierarchy's (a cgroup namespace's mount shows only its part).
fn cgroup2_in(mountinfo: &str) -> Option<&str> {
    mountinfo.lines().find_map(|l| {
        let (fields, after) = l.split_once(" - ")?;
        let fstype = after.split_whitespace().next()?;
        let mut f = fields.split_whitespace();
        let root = f.nth(3)?;
        let at = f.next()?;
        (fstype == "cgroup2" && root == "/").then_some(at)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9";
    const CID: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn the_kubelets_cgroup_paths_name_the_pod_and_container() {
        let systemd = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope\n",
            UID.replace('-', "_")
        );
        let (o, v2) = parse(&systemd);
        assert_eq!(
            o,
            Origin::Pod {
                uid: UID.into(),
                container: Some(CID.into())
            }
        );
        assert!(v2.is_some_and(|p| p.starts_with("/kubepods.slice")));
        // cgroupfs driver, cgroup v1 (no 0:: line), guaranteed QoS.
        let v1 = format!(
            "12:memory:/kubepods/pod{UID}/{CID}\n11:cpu,cpuacct:/kubepods/pod{UID}/{CID}\n"
        );
        let (o, v2) = parse(&v1);
        assert!(matches!(o, Origin::Pod { uid, container: Some(c) } if &*uid == UID && &*c == CID));
        assert_eq!(v2, None);
        // Seen from a container's cgroup namespace: relative, still named.
        let (o, _) = parse(&format!(
            "0::/../../kubepods-besteffort-pod{}.slice/crio-{CID}.scope\n",
            UID.replace('-', "_")
        ));
        assert!(matches!(o, Origin::Pod { .. }));
        // The pod's own cgroup (its pause process): no container.
        let (o, _) = parse(&format!("0::/kubepods/besteffort/pod{UID}\n"));
        assert!(matches!(
            o,
            Origin::Pod {
                container: None,
                ..
            }
        ));
    }

    #[test]
    fn other_cgroups_are_the_nodes() {
        for text in [
            "0::/system.slice/containerd.service\n",
            "0::/\n",
            "0::/user.slice/user-0.slice/session-1.scope\n",
            // Not a UID after `pod`.
            "0::/podman/pod-infra\n",
            "0::/kubepods.slice/kubepods-podnot_a_uid.slice\n",
        ] {
            assert_eq!(parse(text).0, Origin::Node, "{text}");
        }
    }

    #[test]
    fn cgroup2_is_found_in_mountinfo() {
        let hybrid = "\
35 24 0:30 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw
37 35 0:32 / /sys/fs/cgroup/memory rw shared:11 - cgroup cgroup rw,memory
";
        assert_eq!(cgroup2_in(hybrid), Some("/sys/fs/cgroup/unified"));
        let namespaced = "50 40 0:31 /kubepods.slice/x /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_in(namespaced), None);
    }

    #[test]
    fn this_process_is_read_and_its_id_checked() {
        let mut c = Cgroups::new(Path::new("/proc"));
        if !c.host_pids() {
            eprintln!("SKIPPED: not in the host's PID namespace");
            return;
        }
        let me = std::process::id();
        let Some(v2) = c.v2.clone() else {
            eprintln!("SKIPPED: no cgroup v2 mount");
            return;
        };
        let text = std::fs::read_to_string("/proc/self/cgroup").expect("own cgroup");
        let path = parse(&text)
            .1
            .expect("a v2 line")
            .trim_start_matches('/')
            .to_owned();
        let id = std::fs::metadata(v2.join(path))
            .expect("own cgroup dir")
            .ino();
        assert!(c.origin(id, me).is_ok());
        // A wrong id for this PID: another process by now.
        let mut fresh = Cgroups::new(Path::new("/proc"));
        assert_eq!(fresh.origin(id + 1_000_000, me), Err(Unread::Gone));
        assert_eq!(fresh.origin(id, u32::MAX), Err(Unread::Gone));
    }
}
