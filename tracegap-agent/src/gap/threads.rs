//! Which thread wrote each outbound request and which read each inbound
//! one, from the kernel's turns (`EventKind::Thread`: the client's first
//! send of a request on its socket, the server's first receive of one and
//! first send of its answer, in the calling thread).
//!
//! A thread-per-request server reads a request, makes its calls, answers,
//! and only then reads another: the thread that wrote an outbound call
//! read the request it was made for, and no other open one. An async
//! runtime reads many requests on one thread before it calls out for any:
//! a thread then holds several open requests, and its turns prove nothing
//! (the engine falls back, and says so).
//!
//! The answers tell what the requests do not: a task that reads its call's
//! answer and writes its own request's answer without yielding leaves, on
//! its thread, a receive on the call's socket right before the answer's
//! write ([`Handoff`]). A request's answer names at most one call so; a
//! call named by two answers (a task that yielded mid-read, another task's
//! answer written meanwhile) is not decided by it.
//!
//! Turns are keyed by the connection's client end, the one address both
//! ends' sockets and every interface name alike (a Service's address is
//! rewritten on the way, the client's is not).

use std::collections::VecDeque;

use tracegap_common::{ThreadTurn, thread_word};

use crate::{
    FastMap,
    events::{Endpoint, RawEvent},
};

/// A thread: process id (tgid) and thread id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tid {
    pub pid: u32,
    pub tid: u32,
}

/// One turn, decoded from its event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Turn {
    pub ts_ns: u64,
    /// The connection's client end.
    pub client: Endpoint,
    pub side: ThreadTurn,
    pub thread: Tid,
    /// An answer's write turn: the local port of the call whose answer
    /// the thread received just before, if that was its previous operation.
    pub after_call: Option<u16>,
}

impl Turn {
    /// The turn an [`tracegap_common::EventKind::Thread`] event carries.
    pub fn from_event(e: &RawEvent) -> Option<Self> {
        Some(Self {
            ts_ns: e.ts_ns,
            client: e.flow.src,
            side: thread_word::side(e.ifindex)?,
            thread: Tid {
                pid: e.seq,
                tid: e.ack,
            },
            after_call: thread_word::after_call(e.ifindex),
        })
    }
}

/// Turns kept per connection and per thread at most (the newest).
const PER_KEY: usize = 64;
/// Connections and threads remembered at most each.
const MAX_KEYS: usize = 64 * 1024;
/// How far a client's write turn may be from the request's first packet:
/// the turn is taken when the send returns, the packet seen during it (or,
/// when the receive path is deferred, just after).
const WRITE_WINDOW_NS: u64 = 20_000_000;

/// What the turns say of an outbound call's cause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evidence<T> {
    /// The writing thread read exactly this open request, and no request
    /// since.
    Thread(T),
    /// The writing thread served several requests at once (an async
    /// runtime): it holds several open ones, or read others while the one
    /// it holds was open. How many it read in that time.
    Multiplexed(usize),
    /// No write turn was seen for the call.
    Unwritten,
    /// Its thread read none of the open requests.
    Unmatched,
}

impl<T> Evidence<T> {
    /// Why the turns did not single out a request, for the span
    /// (`tracegap.link.threads`).
    pub fn why_not(&self) -> &'static str {
        match self {
            Self::Thread(_) => "thread",
            Self::Multiplexed(_) => "multiplexed",
            Self::Unwritten => "no_write_turn",
            Self::Unmatched => "unmatched",
        }
    }
}

/// What the answers' write turns say of an outbound call's cause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handoff<T> {
    /// One answer (this request's) was written right after the call's
    /// answer was read, and no other answer names the call.
    Named(T),
    /// Several answers name the call: some task yielded in between.
    Contested(usize),
    /// No answer names the call.
    Unnamed,
}

/// The turns seen lately.
#[derive(Default)]
pub struct Threads {
    writes: FastMap<Endpoint, VecDeque<(u64, Tid)>>,
    reads: FastMap<Endpoint, VecDeque<(u64, Tid)>>,
    /// Answers written, by the inbound connection's client end: when, and
    /// the call port named ([`Turn::after_call`]).
    answers: FastMap<Endpoint, VecDeque<(u64, Option<u16>)>>,
    /// The same answers by the call port they name: when.
    named: FastMap<u16, VecDeque<(u64, ())>>,
    /// Per thread, the requests it read: when, and the connection.
    read_by: FastMap<Tid, VecDeque<(u64, Endpoint)>>,
    pub turns: u64,
    /// Answers' write turns seen: none, no call waits for them.
    pub answer_turns: u64,
}

fn push<K: std::hash::Hash + Eq, V>(map: &mut FastMap<K, VecDeque<V>>, k: K, v: V) {
    if map.len() >= MAX_KEYS && !map.contains_key(&k) {
        // A flood of connections: start over rather than grow.
        map.clear();
    }
    let q = map.entry(k).or_default();
    if q.len() >= PER_KEY {
        q.pop_front();
    }
    q.push_back(v);
}

impl Threads {
    pub fn turn(&mut self, t: Turn) {
        self.turns += 1;
        match t.side {
            ThreadTurn::ClientWrote => push(&mut self.writes, t.client, (t.ts_ns, t.thread)),
            ThreadTurn::ServerRead => {
                push(&mut self.reads, t.client, (t.ts_ns, t.thread));
                push(&mut self.read_by, t.thread, (t.ts_ns, t.client));
            }
            ThreadTurn::ServerWrote => {
                self.answer_turns += 1;
                push(&mut self.answers, t.client, (t.ts_ns, t.after_call));
                if let Some(port) = t.after_call {
                    push(&mut self.named, port, (t.ts_ns, ()));
                }
            }
        }
    }

    /// The answer written on `client`'s connection for its request sent
    /// at `start_ns` and answered (as the interface saw it) at `end_ns`,
    /// if it was: the first write turn after the request, before the
    /// answer's packet was seen (or just after: the turn is taken as the
    /// send returns). When it was written, and the call it names; None:
    /// its turn not seen.
    pub fn answer(
        &self,
        client: Endpoint,
        start_ns: u64,
        end_ns: Option<u64>,
    ) -> Option<(u64, Option<u16>)> {
        let until = end_ns.map_or(u64::MAX, |e| e.saturating_add(WRITE_WINDOW_NS));
        self.answers
            .get(&client)?
            .iter()
            .find(|(ts, _)| *ts >= start_ns && *ts <= until)
            .copied()
    }

    /// How many answers named the call from local port `port` answered at
    /// `end_ns` (written after it, within `within_ns`: ports are reused).
    pub fn names(&self, port: u16, end_ns: u64, within_ns: u64) -> usize {
        self.named.get(&port).map_or(0, |q| {
            q.iter()
                .filter(|(ts, _)| *ts >= end_ns && *ts <= end_ns.saturating_add(within_ns))
                .count()
        })
    }

    /// Which of `open` (each: its client end, start, end if answered) had
    /// its answer written right after the answer of the call `caller`
    /// made; and whether some are not answered yet (an answer naming the
    /// call may still come: a task that yielded mid-read lets another
    /// task's answer name the call first, its own follows).
    pub fn handoff<T: Copy>(
        &self,
        caller: Endpoint,
        open: impl Iterator<Item = (T, Endpoint, u64, Option<u64>)>,
    ) -> (Handoff<T>, bool) {
        let mut named = Vec::new();
        let mut pending = false;
        for (o, client, o_start, o_end) in open {
            match self.answer(client, o_start, o_end) {
                Some((_, after)) if after == Some(caller.port) => named.push(o),
                Some(_) => {}
                // Its answer's turn may come with or after its packet.
                None => pending = true,
            }
        }
        let handoff = match named[..] {
            [] => Handoff::Unnamed,
            [o] => Handoff::Named(o),
            _ => Handoff::Contested(named.len()),
        };
        (handoff, pending)
    }

    /// The thread that wrote the request `client` sent at `start_ns`.
    pub fn writer(&self, client: Endpoint, start_ns: u64) -> Option<Tid> {
        self.writes
            .get(&client)?
            .iter()
            .filter(|(ts, _)| ts.abs_diff(start_ns) <= WRITE_WINDOW_NS)
            .min_by_key(|(ts, _)| ts.abs_diff(start_ns))
            .map(|(_, t)| *t)
    }

    /// The thread that read the request `client` sent at `start_ns`, and
    /// when: the server's first read turn after the request was seen (it is
    /// delivered after the interface saw it) and before `until`.
    pub fn reader(&self, client: Endpoint, start_ns: u64, until: u64) -> Option<(Tid, u64)> {
        self.reads
            .get(&client)?
            .iter()
            .find(|(ts, _)| *ts >= start_ns && *ts <= until)
            .map(|(ts, t)| (*t, *ts))
    }

    /// Which of `open` (each: its client end, start, end if answered) the
    /// call `caller` wrote at `start_ns` was made for.
    pub fn cause<T: Copy>(
        &self,
        caller: Endpoint,
        start_ns: u64,
        open: impl Iterator<Item = (T, Endpoint, u64, Option<u64>)>,
    ) -> Evidence<T> {
        let Some(writer) = self.writer(caller, start_ns) else {
            return Evidence::Unwritten;
        };
        let mut mine = Vec::new();
        for (o, client, o_start, o_end) in open {
            if let Some((t, read_at)) = self.reader(client, o_start, o_end.unwrap_or(u64::MAX))
                && t == writer
                && read_at <= start_ns
            {
                mine.push((o, read_at));
            }
        }
        match mine[..] {
            [] => Evidence::Unmatched,
            [(o, read_at)] => {
                // Nothing else read by the thread since. A request it read
                // (and answered) in between, while this one was open, means
                // it does not work one request at a time: it multiplexes,
                // though the others have ended by the call (an async
                // runtime whose other tasks were quick).
                let since = self.read_by.get(&writer).map_or(0, |q| {
                    q.iter()
                        .filter(|(ts, _)| *ts > read_at && *ts <= start_ns)
                        .count()
                });
                if since > 0 {
                    Evidence::Multiplexed(1 + since)
                } else {
                    Evidence::Thread(o)
                }
            }
            _ => Evidence::Multiplexed(mine.len()),
        }
    }

    /// Forgets turns before `ts_ns`.
    pub fn forget_before(&mut self, ts_ns: u64) {
        fn trim<K, V>(map: &mut FastMap<K, VecDeque<(u64, V)>>, ts_ns: u64) {
            map.retain(|_, q| {
                while q.front().is_some_and(|(ts, _)| *ts < ts_ns) {
                    q.pop_front();
                }
                !q.is_empty()
            });
        }
        trim(&mut self.writes, ts_ns);
        trim(&mut self.reads, ts_ns);
        trim(&mut self.read_by, ts_ns);
        trim(&mut self.answers, ts_ns);
        trim(&mut self.named, ts_ns);
    }

    /// Connections and threads remembered, for bounds tests.
    pub fn remembered(&self) -> usize {
        self.writes.len()
            + self.reads.len()
            + self.read_by.len()
            + self.answers.len()
            + self.named.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16) -> Endpoint {
        Endpoint {
            ip: "10.0.0.1".parse().unwrap(),
            port,
        }
    }

    const MS: u64 = 1_000_000;
    const T1: Tid = Tid { pid: 7, tid: 8 };
    const T2: Tid = Tid { pid: 7, tid: 9 };

    fn turn(t: &mut Threads, at: u64, client: u16, side: ThreadTurn, thread: Tid) {
        t.turn(Turn {
            ts_ns: at * MS,
            client: ep(client),
            side,
            thread,
            after_call: None,
        });
    }

    #[test]
    fn a_thread_per_request_call_goes_to_the_request_its_thread_read() {
        let mut t = Threads::default();
        // Two requests in (from ports 1 and 2), read by two threads; the
        // second thread calls out (from port 9).
        turn(&mut t, 10, 1, ThreadTurn::ServerRead, T1);
        turn(&mut t, 11, 2, ThreadTurn::ServerRead, T2);
        turn(&mut t, 20, 9, ThreadTurn::ClientWrote, T2);
        let open = [
            ("a", ep(1), 10 * MS - 1, None),
            ("b", ep(2), 11 * MS - 1, None),
        ];
        assert_eq!(
            t.cause(ep(9), 20 * MS, open.iter().copied()),
            Evidence::Thread("b")
        );
        // A call whose write was not seen: no evidence.
        assert_eq!(
            t.cause(ep(5), 20 * MS, open.iter().copied()),
            Evidence::Unwritten
        );
    }

    #[test]
    fn one_thread_holding_several_open_requests_proves_nothing() {
        let mut t = Threads::default();
        turn(&mut t, 10, 1, ThreadTurn::ServerRead, T1);
        turn(&mut t, 11, 2, ThreadTurn::ServerRead, T1);
        turn(&mut t, 20, 9, ThreadTurn::ClientWrote, T1);
        let open = [
            ("a", ep(1), 10 * MS - 1, None),
            ("b", ep(2), 11 * MS - 1, None),
        ];
        assert_eq!(
            t.cause(ep(9), 20 * MS, open.iter().copied()),
            Evidence::Multiplexed(2)
        );
        // One open, but the thread read (and answered) another since, while
        // it was open: not one request at a time (an async runtime whose
        // other task was quick), multiplexed as well.
        turn(&mut t, 30, 3, ThreadTurn::ServerRead, T2);
        turn(&mut t, 31, 4, ThreadTurn::ServerRead, T2);
        turn(&mut t, 40, 8, ThreadTurn::ClientWrote, T2);
        let open = [
            ("c", ep(3), 30 * MS - 1, None),
            ("d", ep(4), 31 * MS - 1, Some(35 * MS)),
        ];
        assert_eq!(
            t.cause(ep(8), 40 * MS, open[..1].iter().copied()),
            Evidence::Multiplexed(2)
        );
        // A thread that read none of the open requests: unmatched.
        let others = [("e", ep(5), 30 * MS - 1, None)];
        assert_eq!(
            t.cause(ep(8), 40 * MS, others.iter().copied()),
            Evidence::Unmatched
        );
    }

    fn answer(t: &mut Threads, at: u64, client: u16, after_call: Option<u16>) {
        t.turn(Turn {
            ts_ns: at * MS,
            client: ep(client),
            side: ThreadTurn::ServerWrote,
            thread: T1,
            after_call,
        });
    }

    #[test]
    fn an_answer_written_right_after_a_calls_answer_names_that_call() {
        let mut t = Threads::default();
        // Requests from ports 1 and 2, answered at 30 and 31 ms: the first
        // right after reading the answer of the call from port 9, the
        // second after something else.
        answer(&mut t, 30, 1, Some(9));
        answer(&mut t, 31, 2, None);
        let open = [
            ("a", ep(1), 10 * MS, Some(30 * MS)),
            ("b", ep(2), 11 * MS, Some(31 * MS)),
        ];
        assert_eq!(
            t.handoff(ep(9), open.iter().copied()),
            (Handoff::Named("a"), false)
        );
        // Another call: named by none.
        assert_eq!(
            t.handoff(ep(8), open.iter().copied()),
            (Handoff::Unnamed, false)
        );
        // An answer written before the request (keep-alive: the previous
        // one on the connection) names nothing for it; its own answer's
        // turn is still to come.
        let later = [("c", ep(1), 40 * MS, Some(50 * MS))];
        assert_eq!(
            t.handoff(ep(9), later.iter().copied()),
            (Handoff::Unnamed, true)
        );
    }

    #[test]
    fn a_call_named_by_two_answers_is_contested_and_one_unanswered_may_still_name_it() {
        let mut t = Threads::default();
        // A task yielded mid-read of the call's answer: another task's
        // answer was written meanwhile, then its own.
        answer(&mut t, 30, 1, Some(9));
        answer(&mut t, 31, 2, Some(9));
        let open = [
            ("a", ep(1), 10 * MS, Some(30 * MS)),
            ("b", ep(2), 11 * MS, Some(31 * MS)),
            ("c", ep(3), 12 * MS, None),
        ];
        assert_eq!(
            t.handoff(ep(9), open.iter().copied()),
            (Handoff::Contested(2), true)
        );
        // One named, one not answered yet: it may still name the call.
        assert_eq!(
            t.handoff(ep(9), [open[0], open[2]].iter().copied()),
            (Handoff::Named("a"), true)
        );
    }

    #[test]
    fn old_turns_are_forgotten_and_the_maps_stay_bounded() {
        let mut t = Threads::default();
        for i in 0..(PER_KEY as u64 * 2) {
            turn(&mut t, i, 1, ThreadTurn::ServerRead, T1);
            answer(&mut t, i, 1, Some(9));
        }
        assert_eq!(t.answers[&ep(1)].len(), PER_KEY);
        assert_eq!(t.reads[&ep(1)].len(), PER_KEY);
        t.forget_before(u64::MAX);
        assert_eq!(t.remembered(), 0);
    }
}
