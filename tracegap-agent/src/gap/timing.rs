//! Which open inbound request an outbound call was made for, by timing
//! alone: the fallback where the threads cannot tell (an async runtime
//! serves many requests on one thread; a kernel without thread
//! programs).
//!
//! A handler that awaits its call answers soon after the call's answer
//! came back: of the requests open when the call started, its cause is the
//! one whose own answer follows the call's end most closely. Scored on
//! both ends: a candidate arrived before the call started (the caller only
//! offers those) and answered after the call's answer. One to one: a
//! candidate that a later call of the caller clearly claims by the same
//! rule is not this one's; a candidate already given to a call is out.
//!
//! A guess is not a fact: the call is placed only when the best candidate
//! clearly beats the runner-up ([`RATIO`], [`MIN_GAP_NS`]) and answered
//! promptly ([`MAX_DELAY_NS`]); a candidate not answered yet is as far as
//! the time already waited, so the decision waits (the pipeline holds the
//! call) until the answers that could change it are in.

/// The runner-up must answer at least this many times later than the best.
pub const RATIO: u64 = 4;
/// And at least this much later (below it, scheduling noise decides).
pub const MIN_GAP_NS: u64 = 1_000_000;
/// How far out of time order events may reach the agent (several CPUs
/// write the ring).
pub const SKEW_NS: u64 = 1_000_000;
/// The best candidate must answer within this of the call's end.
pub const MAX_DELAY_NS: u64 = 250_000_000;

/// A request that was open when the call started.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<T> {
    pub id: T,
    pub start_ns: u64,
    /// When its answer was first seen (None: not yet).
    pub answered_ns: Option<u64>,
    /// Already given to another call.
    pub taken: bool,
}

/// Another call of the same caller that ended after this one, with the
/// requests open when it started.
#[derive(Clone, Debug)]
pub struct OtherCall<T> {
    pub end_ns: u64,
    pub candidates: Vec<Candidate<T>>,
}

/// What timing says of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timing<T> {
    /// This candidate, clearly.
    Placed(T),
    /// The answers that could decide it are not all in yet.
    Pending,
    /// No candidate clearly beats the others.
    Unclear,
}

/// Decides the call that ended (its answer seen) at `end_ns`, with what
/// was seen up to `now_ns`, among `candidates`, one to one with the
/// caller's `others` calls: a candidate another call clearly claims (by
/// the same rule, alone) is not this one's.
pub fn assign<T: Copy + PartialEq>(
    end_ns: u64,
    now_ns: u64,
    candidates: &[Candidate<T>],
    others: &[OtherCall<T>],
) -> Timing<T> {
    let claimed: Vec<T> = others
        .iter()
        .filter(|o| o.end_ns > end_ns)
        .filter_map(|o| match decide(o.end_ns, now_ns, &o.candidates) {
            Timing::Placed(t) => Some(t),
            _ => None,
        })
        .collect();
    let left: Vec<Candidate<T>> = candidates
        .iter()
        .map(|c| Candidate {
            taken: c.taken || claimed.contains(&c.id),
            ..*c
        })
        .collect();
    decide(end_ns, now_ns, &left)
}

/// The rule for one call alone.
fn decide<T: Copy>(end_ns: u64, now_ns: u64, candidates: &[Candidate<T>]) -> Timing<T> {
    // Each candidate's delay after the call's end, when known; one not
    // answered yet is at least as far as the time waited so far.
    let waited = now_ns.saturating_sub(end_ns);
    let mut known: Vec<(u64, T)> = Vec::with_capacity(candidates.len());
    let mut unanswered = false;
    for c in candidates.iter().filter(|c| !c.taken) {
        match c.answered_ns {
            None => unanswered = true,
            // Answered before the call's answer came back: not waiting
            // for it.
            Some(a) if a < end_ns => {}
            Some(a) => known.push((a - end_ns, c.id)),
        }
    }
    known.sort_unstable_by_key(|(d, _)| *d);
    let Some(&(delay, id)) = known.first() else {
        // Nothing answered after the call yet: wait while one may.
        return if unanswered && waited < MAX_DELAY_NS {
            Timing::Pending
        } else {
            Timing::Unclear
        };
    };
    if delay > MAX_DELAY_NS {
        return Timing::Unclear;
    }
    let bar = delay.saturating_mul(RATIO).max(delay + MIN_GAP_NS);
    if known.get(1).is_some_and(|(d, _)| *d < bar) {
        // A runner-up answered too close: waiting will not tell them apart.
        return Timing::Unclear;
    }
    if unanswered && waited < bar {
        // One not answered yet may still answer within the bar.
        return Timing::Pending;
    }
    Timing::Placed(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn c(id: &'static str, start: u64, answered: Option<u64>) -> Candidate<&'static str> {
        Candidate {
            id,
            start_ns: start * MS / 10,
            answered_ns: answered.map(|a| a * MS / 10),
            taken: false,
        }
    }

    #[test]
    fn the_request_answered_right_after_the_call_returned_is_its_cause() {
        // Call ends at 10 ms; "a" answers 0.1 ms later, "b" 5 ms later.
        let cands = [c("a", 0, Some(101)), c("b", 10, Some(150))];
        assert_eq!(assign(10 * MS, 20 * MS, &cands, &[]), Timing::Placed("a"));
        // Too close a runner-up: no guess.
        let cands = [c("a", 0, Some(101)), c("b", 10, Some(103))];
        assert_eq!(assign(10 * MS, 20 * MS, &cands, &[]), Timing::Unclear);
    }

    #[test]
    fn a_candidate_not_answered_yet_holds_the_decision_until_it_cannot_win() {
        let cands = [c("a", 0, Some(101)), c("b", 10, None)];
        // 0.5 ms after the call: "b" may still answer within the bar.
        assert_eq!(
            assign(10 * MS, 10 * MS + MS / 2, &cands, &[]),
            Timing::Pending
        );
        // 2 ms after: whatever "b" does, "a" is clearly first.
        assert_eq!(assign(10 * MS, 12 * MS, &cands, &[]), Timing::Placed("a"));
        // Nothing answered yet: wait; nothing answered for long: unclear.
        let cands = [c("a", 0, None), c("b", 10, None)];
        assert_eq!(assign(10 * MS, 11 * MS, &cands, &[]), Timing::Pending);
        assert_eq!(
            assign(10 * MS, 10 * MS + MAX_DELAY_NS, &cands, &[]),
            Timing::Unclear
        );
    }

    #[test]
    fn one_to_one_a_request_another_call_clearly_claims_is_that_calls() {
        // "a" answers 0.2 ms after this call (10 ms), "b" 0.9 ms after: too
        // close to tell alone.
        let cands = [c("a", 0, Some(102)), c("b", 5, Some(109))];
        assert_eq!(assign(10 * MS, 20 * MS, &cands, &[]), Timing::Unclear);
        // Another call ended at 10.15 ms, "a" answering 0.05 ms after it
        // and nothing else near: "a" is that call's, "b" this one's.
        let other = |b_answer| OtherCall {
            end_ns: 10 * MS + 150_000,
            candidates: vec![c("a", 0, Some(102)), c("b", 5, Some(b_answer))],
        };
        assert_eq!(
            assign(10 * MS, 20 * MS, &cands, &[other(150)]),
            Timing::Placed("b")
        );
        // A claim that is itself unclear claims nothing.
        assert_eq!(
            assign(10 * MS, 20 * MS, &cands, &[other(109)]),
            Timing::Unclear
        );
        // A request already given to a call is out.
        let mut cands = [c("a", 0, Some(101)), c("b", 5, Some(101))];
        assert_eq!(assign(10 * MS, 20 * MS, &cands, &[]), Timing::Unclear);
        cands[1].taken = true;
        assert_eq!(assign(10 * MS, 20 * MS, &cands, &[]), Timing::Placed("a"));
    }

    #[test]
    fn a_request_answered_before_the_call_returned_or_long_after_is_not_its_cause() {
        let cands = [c("a", 0, Some(90)), c("b", 5, Some(100 + 3000))];
        assert_eq!(assign(10 * MS, 400 * MS, &cands, &[]), Timing::Unclear);
    }
}
