//! Process trees read from /proc, and the freeze-then-kill that ends one completely.
//!
//! Every command runs under its own supervisor, a child subreaper (see [`crate::supervisor`]),
//! so everything the command starts stays a descendant of that supervisor however it
//! forks, setsids or clears its environment: parentage is the one thing a process cannot
//! shed. Ending a tree therefore means: find the descendants, stop them (SIGSTOP: a
//! stopped process cannot fork, and unlike a killed one it keeps its pid, so a fork bomb
//! runs into the pids limit instead of refilling freed slots), repeat until every member
//! was seen stopped, then SIGKILL them all, and repeat the whole until nothing of the tree
//! is left alive (something outside the tree may have woken a member).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rustix::process::Signal;

use crate::sys;

/// How long ending one tree may take before the stragglers are killed unfrozen (a process
/// in uninterruptible sleep cannot stop) and the call gives up waiting.
pub const KILL_DEADLINE: Duration = Duration::from_secs(10);

/// One process as `/proc/<pid>/stat` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Its pid.
    pub pid: u32,
    /// Its parent's pid (0 for a process whose parent is outside our pid namespace).
    pub ppid: u32,
    /// Its process group.
    pub pgid: u32,
    /// State letter (`R`, `S`, `D`, `T`, `t`, `Z`, ...).
    pub state: char,
    /// Start time in clock ticks after boot: with the pid, identifies the process.
    pub start: u64,
}

impl ProcStat {
    /// Parses the contents of `/proc/<pid>/stat` (the command name may hold anything,
    /// so fields are counted from its closing parenthesis).
    pub fn parse(pid: u32, text: &str) -> Option<Self> {
        let rest = &text[text.rfind(')')? + 1..];
        let mut f = rest.split_whitespace();
        let state = f.next()?.chars().next()?;
        let ppid = f.next()?.parse().ok()?;
        let pgid = f.next()?.parse().ok()?;
        // Field 22 overall is the start time; pgid was field 5.
        let start = f.nth(16)?.parse().ok()?;
        Some(Self {
            pid,
            ppid,
            pgid,
            state,
            start,
        })
    }

    /// Stopped or traced: it cannot run, so it cannot fork.
    pub fn stopped(&self) -> bool {
        matches!(self.state, 'T' | 't')
    }

    /// Dead already (a zombie waiting to be reaped, or gone).
    pub fn dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Every process visible in /proc at one moment.
#[derive(Debug, Default)]
pub struct Snapshot {
    procs: HashMap<u32, ProcStat>,
}

impl Snapshot {
    /// Reads /proc. Processes that vanish while it reads are simply absent.
    pub fn take() -> Self {
        let mut procs = HashMap::new();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if let Some(st) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|t| ProcStat::parse(pid, &t))
                {
                    procs.insert(pid, st);
                }
            }
        }
        Self { procs }
    }

    /// The process with `pid`, if it exists.
    pub fn get(&self, pid: u32) -> Option<&ProcStat> {
        self.procs.get(&pid)
    }

    /// Every descendant of `root` (not `root` itself).
    pub fn descendants(&self, root: u32) -> Vec<ProcStat> {
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        for p in self.procs.values() {
            children.entry(p.ppid).or_default().push(p.pid);
        }
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut stack = vec![root];
        while let Some(p) = stack.pop() {
            for c in children.get(&p).map(Vec::as_slice).unwrap_or_default() {
                if *c != root && seen.insert(*c) {
                    if let Some(st) = self.procs.get(c) {
                        out.push(*st);
                    }
                    stack.push(*c);
                }
            }
        }
        out
    }

    /// Every process but PID 1 and `me`.
    pub fn all_but(&self, me: u32) -> Vec<ProcStat> {
        self.procs
            .values()
            .filter(|p| p.pid > 1 && p.pid != me)
            .copied()
            .collect()
    }
}

/// Which processes a kill addresses, read afresh from each snapshot.
pub trait Scope {
    /// The members of the scope in `snap`.
    fn members(&self, snap: &Snapshot) -> Vec<ProcStat>;
}

impl<F: Fn(&Snapshot) -> Vec<ProcStat>> Scope for F {
    fn members(&self, snap: &Snapshot) -> Vec<ProcStat> {
        self(snap)
    }
}

/// The process groups of `parent`'s direct children, read from its own `children` list:
/// a few small reads, where a snapshot reads all of /proc. A fork bomb keeps every CPU
/// busy, so the first stop must come before the first slow snapshot.
pub fn children_groups(parent: u32) -> Vec<u32> {
    let Ok(list) = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")) else {
        return Vec::new();
    };
    let mut groups: Vec<u32> = list
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
        .filter_map(|c| {
            let st = std::fs::read_to_string(format!("/proc/{c}/stat")).ok()?;
            ProcStat::parse(c, &st).filter(|p| p.ppid == parent && !p.dead())
        })
        .map(|p| p.pgid)
        .collect();
    groups.sort_unstable();
    groups.dedup();
    groups
}

/// Sends `sig` to every live member of the scope once; returns how many got it.
pub fn signal_once(scope: &dyn Scope, sig: Signal) -> usize {
    let snap = Snapshot::take();
    let mut n = 0;
    for p in scope.members(&snap).iter().filter(|p| !p.dead()) {
        if sys::kill_pid(p.pid, sig).is_ok() {
            n += 1;
        }
        if sig != Signal::KILL && sig != Signal::CONT {
            // A stopped process must run to act on the signal.
            let _ = sys::kill_pid(p.pid, Signal::CONT);
        }
    }
    n
}

/// The process groups of `live` members that may be signalled whole: all but the
/// `protected` ones (the agent's own group, the supervisors'). Signalling a group reaches
/// all of it at once, even a child forked a moment ago (the kernel signals a group
/// atomically with respect to fork), which is what stops fork bombs and fast fork chains.
/// It is safe because a member's group is always in a session that a member created
/// (`setpgid` cannot cross sessions and a session only holds its leader's descendants),
/// except a command's first moments in its supervisor's group, which is protected.
fn member_groups(live: &[&ProcStat], protected: &dyn Fn(u32) -> bool) -> Vec<u32> {
    let mut groups: Vec<u32> = live
        .iter()
        .map(|p| p.pgid)
        .filter(|g| *g > 1 && !protected(*g))
        .collect();
    groups.sort_unstable();
    groups.dedup();
    groups
}

/// Freezes and kills every member of the scope until none is left alive, or until
/// `deadline` (then whatever is seen is killed unfrozen for a little longer); returns
/// how many distinct processes were killed.
/// `first_groups`: groups known to hold only members, stopped before anything else.
pub fn freeze_and_kill(
    scope: &dyn Scope,
    first_groups: &[u32],
    protected: &dyn Fn(u32) -> bool,
    deadline: Instant,
) -> usize {
    for g in first_groups.iter().filter(|g| **g > 1 && !protected(**g)) {
        let _ = sys::kill_group(*g, Signal::STOP);
    }
    let hard_stop = deadline + Duration::from_secs(2);
    let mut killed: HashSet<(u32, u64)> = HashSet::new();
    let mut rounds: u32 = 0;
    loop {
        rounds = rounds.wrapping_add(1);
        let snap = Snapshot::take();
        let members = scope.members(&snap);
        let live: Vec<&ProcStat> = members
            .iter()
            .filter(|p| !p.dead() && !killed.contains(&(p.pid, p.start)))
            .collect();
        let now = Instant::now();
        let late = now >= deadline;
        if now >= hard_stop {
            return killed.len();
        }
        if live.is_empty() {
            // Everything was killed; wait until the kills have landed.
            if members.iter().all(|p| p.dead()) || late {
                return killed.len();
            }
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        let all_stopped = live.iter().all(|p| p.stopped());
        if all_stopped || late {
            // One by one first (counted: nothing seen can fork now), then by group, for
            // anything that was woken meanwhile.
            for p in &live {
                if sys::kill_pid(p.pid, Signal::KILL).is_ok() {
                    killed.insert((p.pid, p.start));
                }
            }
            for g in member_groups(&live, protected) {
                let _ = sys::kill_group(g, Signal::KILL);
            }
            continue;
        }
        for g in member_groups(&live, protected) {
            let _ = sys::kill_group(g, Signal::STOP);
        }
        for p in live.iter().filter(|p| !p.stopped()) {
            let _ = sys::kill_pid(p.pid, Signal::STOP);
        }
        // Give the stops a moment to land before looking again (they are asynchronous).
        if rounds % 4 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        let line = "4242 (a b) c)) S 17 4240 4242 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        let st = ProcStat::parse(4242, line).expect("parses");
        assert_eq!(
            (st.pid, st.ppid, st.pgid, st.state, st.start),
            (4242, 17, 4240, 'S', 987_654)
        );
        assert!(!st.stopped() && !st.dead());
        assert!(ProcStat::parse(1, "garbage").is_none());
    }

    #[test]
    fn descendants_follow_parentage_not_sessions() {
        let mk = |pid, ppid| ProcStat {
            pid,
            ppid,
            pgid: pid,
            state: 'S',
            start: 1,
        };
        let mut snap = Snapshot::default();
        for (pid, ppid) in [(10, 1), (11, 10), (12, 11), (13, 12), (20, 1), (21, 20)] {
            snap.procs.insert(pid, mk(pid, ppid));
        }
        let mut d: Vec<u32> = snap.descendants(10).iter().map(|p| p.pid).collect();
        d.sort();
        assert_eq!(d, vec![11, 12, 13]);
        assert!(snap.descendants(13).is_empty());
        let mut all: Vec<u32> = snap.all_but(20).iter().map(|p| p.pid).collect();
        all.sort();
        assert_eq!(all, vec![10, 11, 12, 13, 21]);
        // Groups are signalled whole unless protected.
        for (pid, pgid) in [(11, 10), (12, 10), (21, 20)] {
            if let Some(p) = snap.procs.get_mut(&pid) {
                p.pgid = pgid;
            }
        }
        let members = snap.descendants(1);
        let live: Vec<&ProcStat> = members.iter().collect();
        assert_eq!(member_groups(&live, &|_| false), vec![10, 13, 20]);
        assert_eq!(member_groups(&live, &|g| g == 10), vec![13, 20]);
    }

    #[test]
    fn this_process_reads_itself_from_proc() {
        let snap = Snapshot::take();
        let me = snap.get(std::process::id()).expect("own stat");
        assert_eq!(
            me.ppid,
            rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get().unsigned_abs())
        );
        assert!(!me.dead());
    }
}
