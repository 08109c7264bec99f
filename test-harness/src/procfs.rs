//! Looking at processes through Linux's `/proc`: which children a daemon has, whether one
//! has ended.

/// `(state, ppid)` of a process from `/proc/<pid>/stat`; `None` when it does not exist.
fn stat(pid: u32) -> Option<(char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`, where comm may itself hold spaces and parentheses.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// The pids of the live (not zombie) child processes of `parent` (Linux `/proc`).
pub fn child_pids(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| matches!(stat(*pid), Some((state, ppid)) if ppid == parent && state != 'Z'))
        .collect();
    pids.sort_unstable();
    pids
}

/// Whether process `pid` has ended: it no longer exists, or is a zombie nobody reaped yet.
pub fn process_gone(pid: u32) -> bool {
    !matches!(stat(pid), Some((state, _)) if state != 'Z')
}
