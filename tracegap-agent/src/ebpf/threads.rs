//! Attaching the thread programs (see `tracegap-ebpf/src/threads.rs`): the
//! raw tracepoints on each socket send and receive where the kernel has
//! them (6.3 and later), else `fexit` on TCP's own send and receive, else
//! nothing (calls are then related to requests by the wire alone, and the
//! agent says so).

use std::net::IpAddr;

use aya::{
    Btf, Ebpf,
    maps::{HashMap, MapData},
    programs::{
        FExit, Program, ProgramError, RawTracePoint, fexit::FExitLinkId,
        raw_trace_point::RawTracePointLinkId,
    },
};
use tracegap_common::{SourceKey, family};

use crate::FastMap;

/// Program names in the object.
pub const SOCK_SEND: &str = "tracegap_sock_send";
pub const SOCK_RECV: &str = "tracegap_sock_recv";
pub const TCP_SENDMSG: &str = "tracegap_tcp_sendmsg";
pub const TCP_RECVMSG: &str = "tracegap_tcp_recvmsg";
/// Forgets a socket's memoized verdict on each TCP state change.
pub const SOCK_STATE: &str = "tracegap_sock_state";

/// The raw tracepoint pair: program, tracepoint.
const TRACEPOINTS: [(&str, &str); 2] = [
    (SOCK_SEND, "sock_send_length"),
    (SOCK_RECV, "sock_recv_length"),
];
/// The fexit pair: program, kernel function.
const FEXITS: [(&str, &str); 2] = [(TCP_SENDMSG, "tcp_sendmsg"), (TCP_RECVMSG, "tcp_recvmsg")];

/// The map of relays' addresses.
pub const RELAYS: &str = "RELAYS";
/// The relays' filter (see [`Relays`]).
pub const RELAY_FILTER: &str = "RELAY_FILTER";
/// The relay set's epoch: bumped after each change, it voids the
/// programs' memo of sockets found not to be a relay's.
pub const RELAY_EPOCH: &str = "RELAY_EPOCH";

/// How often a relay is written again (the kernel's map is an LRU).
const REFRESH_NS: u64 = 60_000_000_000;

/// The pods whose threads are asked about: those seen both serving
/// requests and making calls (a call is tied to a request of the same
/// pod). Everything else, an echo server, a load generator, costs the
/// thread programs two reads and an array read on a socket's first send or
/// receive (the filter; the map only when its slot is set), then an array
/// read (their memo of sockets judged, voided by each change here).
pub struct Relays {
    map: HashMap<MapData, SourceKey, u8>,
    /// Slots of the map's addresses, read first (see
    /// [`tracegap_common::relay_slot`]).
    filter: aya::maps::Array<MapData, u8>,
    /// The relay set's epoch; None when the memo is off.
    epoch: Option<aya::maps::Array<MapData, u32>>,
    written: FastMap<IpAddr, u64>,
}

impl Relays {
    pub fn new(
        map: HashMap<MapData, SourceKey, u8>,
        filter: aya::maps::Array<MapData, u8>,
        epoch: Option<aya::maps::Array<MapData, u32>>,
    ) -> Self {
        Self {
            map,
            filter,
            epoch,
            written: FastMap::default(),
        }
    }

    /// `ip` is a relay (seen at `now_ns`): written to the kernel's map when
    /// new, and again now and then.
    pub fn mark(&mut self, ip: IpAddr, now_ns: u64) {
        if self
            .written
            .get(&ip)
            .is_some_and(|at| now_ns.saturating_sub(*at) < REFRESH_NS)
        {
            return;
        }
        if self.written.len() >= tracegap_common::MAX_RELAYS as usize {
            self.written.clear();
        }
        let mut key = SourceKey::default();
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                key.addr[..4].copy_from_slice(&v4.octets());
                key.family = family::IPV4;
            }
            IpAddr::V6(v6) => {
                key.addr = v6.octets();
                key.family = family::IPV6;
            }
        }
        // The filter's slot first: the programs ask it before the map.
        if let Err(e) = self
            .filter
            .set(tracegap_common::relay_slot(&key.addr, key.family), 1, 0)
        {
            tracing::warn!(%ip, error = %e, "marking a relay in the filter");
            return;
        }
        match self.map.insert(key, 1, 0) {
            Ok(()) => {
                self.written.insert(ip, now_ns);
                tracing::debug!(%ip, "a relay: its threads' turns are recorded");
            }
            Err(e) => tracing::warn!(%ip, error = %e, "writing a relay"),
        }
        // After the write, so a socket judged under the new epoch was
        // judged against the new set. A refresh bumps it too: the kernel's
        // map may have dropped the address meanwhile (an LRU).
        self.bump();
    }

    fn bump(&mut self) {
        let Some(map) = &mut self.epoch else {
            return;
        };
        if let Err(e) = bump(map) {
            // The memo would keep verdicts from the old set: turn it off.
            tracing::warn!(error = %e, "bumping the relay set's epoch; the programs' memo is off");
            let _ = map.set(0, 0, 0);
            self.epoch = None;
        }
    }
}

/// Moves the relay set's epoch on, voiding every verdict the programs
/// memoized: never to 0 (the memo's off switch) nor to a multiple of 2^16
/// (the tag keeps 16 bits of it: that one would read as epoch 0's).
fn bump<T: std::borrow::BorrowMut<MapData>>(
    map: &mut aya::maps::Array<T, u32>,
) -> Result<(), aya::maps::MapError> {
    let mut next = map.get(&0, 0)?.wrapping_add(1);
    if next & 0xffff == 0 {
        next = next.wrapping_add(1);
    }
    map.set(0, next, 0)
}

/// Where the threads' turns come from on this kernel (the programs'
/// names: the raw tracepoints' or the fexit ones).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Evidence {
    /// `sock_send_length` / `sock_recv_length` raw tracepoints.
    Tracepoints,
    /// `fexit` on `tcp_sendmsg` / `tcp_recvmsg`.
    Fexit,
    /// None: why, for the log and /readyz.
    Unavailable(String),
}

impl Evidence {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Tracepoints => "tracepoints",
            Self::Fexit => "fexit",
            Self::Unavailable(_) => "none",
        }
    }
}

/// The send and receive pair's links, to detach the pair and attach it
/// again without loading (and verifying) it anew. The memo's state
/// program stays attached meanwhile: a socket that changes state while
/// the pair is away is forgotten as ever, so the memo holds no verdict of
/// a socket reused since.
#[derive(Default)]
pub struct Links(Vec<Link>);

enum Link {
    Tracepoint(&'static str, RawTracePointLinkId),
    Fexit(&'static str, FExitLinkId),
}

impl Links {
    /// Detaches the pair; their programs stay loaded.
    pub fn detach(&mut self, ebpf: &mut Ebpf) -> Result<(), String> {
        for link in self.0.drain(..) {
            match link {
                Link::Tracepoint(name, id) => tracepoint(ebpf, name)?
                    .detach(id)
                    .map_err(|e| format!("{name}: {e}"))?,
                Link::Fexit(name, id) => fexit(ebpf, name)?
                    .detach(id)
                    .map_err(|e| format!("{name}: {e}"))?,
            }
        }
        Ok(())
    }

    /// Attaches the pair `evidence` names again (they are loaded).
    pub fn attach(&mut self, ebpf: &mut Ebpf, evidence: &Evidence) -> Result<(), String> {
        if !self.0.is_empty() {
            return Ok(());
        }
        match evidence {
            Evidence::Tracepoints => {
                for (name, tp) in TRACEPOINTS {
                    let id = tracepoint(ebpf, name)?
                        .attach(tp)
                        .map_err(|e| format!("{tp}: {e}"))?;
                    self.0.push(Link::Tracepoint(name, id));
                }
            }
            Evidence::Fexit => {
                for (name, function) in FEXITS {
                    let id = fexit(ebpf, name)?
                        .attach()
                        .map_err(|e| format!("fexit {function}: {e}"))?;
                    self.0.push(Link::Fexit(name, id));
                }
            }
            Evidence::Unavailable(_) => {}
        }
        Ok(())
    }
}

/// The program `name` of the object, as its kind.
pub(super) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| format!("{name} is not in the object"))?
        .try_into()
        .map_err(|e: ProgramError| format!("{name}: {e}"))
}

fn tracepoint<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut RawTracePoint, String> {
    program(ebpf, name)
}

fn fexit<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut FExit, String> {
    program(ebpf, name)
}

/// Loads and attaches the best pair of programs the kernel takes, and
/// whether their memo is on (see [`memo_on`]). The links belong to the
/// programs, which belong to `ebpf`: dropping it detaches them.
pub fn attach(ebpf: &mut Ebpf, offsets_found: Result<(), String>) -> (Evidence, bool, Links) {
    if let Err(why) = offsets_found {
        return (Evidence::Unavailable(why), false, Links::default());
    }
    let mut links = Links::default();
    let tracepoints = (|| -> Result<(), String> {
        for (name, _) in TRACEPOINTS {
            tracepoint(ebpf, name)?
                .load()
                .map_err(|e| format!("{name}: {e}"))?;
        }
        links.attach(ebpf, &Evidence::Tracepoints)
    })();
    let why_not_tracepoints = match tracepoints {
        Ok(()) => return (Evidence::Tracepoints, memo_on(ebpf), links),
        Err(e) => e,
    };
    // A pair half attached would record one side only: detach it.
    unload(ebpf, &[SOCK_SEND, SOCK_RECV]);
    links = Links::default();
    let fexits = (|| -> Result<(), String> {
        let btf = Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {e}"))?;
        for (name, function) in FEXITS {
            fexit(ebpf, name)?
                .load(function, &btf)
                .map_err(|e| format!("{name}: {e}"))?;
        }
        links.attach(ebpf, &Evidence::Fexit)
    })();
    match fexits {
        Ok(()) => (Evidence::Fexit, memo_on(ebpf), links),
        Err(e) => {
            unload(ebpf, &[TCP_SENDMSG, TCP_RECVMSG]);
            (
                Evidence::Unavailable(format!(
                    "socket tracepoints: {why_not_tracepoints}; fexit: {e}"
                )),
                false,
                Links::default(),
            )
        }
    }
}

/// Attaches the program that forgets a socket's verdict when its TCP state
/// changes, and only then turns the programs' memo on (a new epoch: any
/// verdict left from an earlier attachment is void): without it, a reused
/// socket address could be taken for a non-relay's. Without it the
/// programs check every send and receive in full.
fn memo_on(ebpf: &mut Ebpf) -> bool {
    let attached = (|| -> Result<(), String> {
        let p = tracepoint(ebpf, SOCK_STATE)?;
        p.load().map_err(|e| format!("{SOCK_STATE}: {e}"))?;
        p.attach("inet_sock_set_state")
            .map_err(|e| format!("inet_sock_set_state: {e}"))?;
        let map = ebpf
            .map_mut(RELAY_EPOCH)
            .ok_or_else(|| format!("{RELAY_EPOCH} is not in the object"))?;
        aya::maps::Array::<_, u32>::try_from(map)
            .and_then(|mut a| bump(&mut a))
            .map_err(|e| format!("{RELAY_EPOCH}: {e}"))
    })();
    if let Err(why) = &attached {
        unload(ebpf, &[SOCK_STATE]);
        // Off: an epoch left from an earlier attachment would keep its
        // verdicts, unwatched.
        if let Some(map) = ebpf.map_mut(RELAY_EPOCH) {
            let _ = aya::maps::Array::<_, u32>::try_from(map).and_then(|mut a| a.set(0, 0, 0));
        }
        tracing::warn!(%why, "the thread programs check every socket send and receive in full");
    }
    attached.is_ok()
}

fn unload(ebpf: &mut Ebpf, names: &[&str]) {
    for name in names {
        if let Some(p) = ebpf.program_mut(name) {
            // Unloading detaches its links; a program never loaded is fine.
            let _ = match p {
                aya::programs::Program::RawTracePoint(p) => p.unload(),
                aya::programs::Program::FExit(p) => p.unload(),
                _ => Ok(()),
            };
        }
    }
}
