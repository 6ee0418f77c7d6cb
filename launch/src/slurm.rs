//! Running as one task of a Slurm job step (`srun gantry launch …`): this task's rank, the
//! job's world and where rank 0 serves the rendezvous store, all from Slurm's environment,
//! so no coordinator is needed.
//!
//! Pure (std only, no process state): `launch/tests/slurm.rs` includes this file by path to
//! test the hostlist grammar and the environment rules directly.

use std::fmt;

/// More hosts than any real allocation: a nodelist expanding past this is a typo
/// (`node[1-10000000]`), and expanding it would only exhaust memory.
pub const MAX_HOSTS: usize = 1_000_000;

/// The port rank 0 serves the store on when `MASTER_PORT` is unset: 29500 (torch's default)
/// plus the job id modulo 1000, so two jobs sharing a first node rarely collide.
pub const BASE_PORT: u16 = 29500;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlurmError {
    /// A hostlist that does not follow Slurm's syntax.
    Nodelist { list: String, reason: String },
    /// A variable this task needs is not set.
    Missing { var: &'static str, context: String },
    /// A variable is set to something unusable.
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
}

impl fmt::Display for SlurmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlurmError::Nodelist { list, reason } => write!(f, "nodelist `{list}`: {reason}"),
            SlurmError::Missing { var, context } => write!(f, "{context}, but {var} is not set"),
            SlurmError::Invalid { var, value, reason } => write!(f, "{var}=`{value}`: {reason}"),
        }
    }
}

impl std::error::Error for SlurmError {}

/// Expand a Slurm hostlist (`a,b`, `node[01-03,07]`, `rack[1-2]-gpu[1-2]`) into host names,
/// in Slurm's order: items left to right; within an item, the first bracket varies slowest.
/// Zero padding of a range's low bound is kept (`[08-10]` → `08 09 10`).
pub fn expand_nodelist(list: &str) -> Result<Vec<String>, SlurmError> {
    let bad = |reason: String| SlurmError::Nodelist {
        list: list.to_string(),
        reason,
    };
    let items = split_items(list).map_err(bad)?;
    if items.is_empty() {
        return Err(bad("no host names".into()));
    }
    // Count first, so an absurd list is refused before anything is allocated for it.
    let mut parsed = Vec::with_capacity(items.len());
    let mut total: usize = 0;
    for item in items {
        let parts = parse_item(item).map_err(bad)?;
        let n = parts.iter().try_fold(1usize, |acc, p| match p {
            Part::Text(_) => Some(acc),
            Part::Choice(c) => acc.checked_mul(c.len()),
        });
        total = n
            .and_then(|n| total.checked_add(n))
            .filter(|&t| t <= MAX_HOSTS)
            .ok_or_else(|| bad(format!("expands to more than {MAX_HOSTS} hosts")))?;
        parsed.push(parts);
    }
    let mut out = Vec::with_capacity(total);
    for parts in &parsed {
        expand_parts(parts, String::new(), &mut out);
    }
    Ok(out)
}

/// One piece of a hostlist item: literal text, or a bracket's alternatives (already
/// formatted with their padding).
enum Part {
    Text(String),
    Choice(Vec<String>),
}

/// Split at commas outside brackets.
fn split_items(list: &str) -> Result<Vec<&str>, String> {
    let list = list.trim();
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth > 0 => return Err(format!("nested `[` at byte {i}")),
            '[' => depth = 1,
            ']' if depth == 0 => return Err(format!("`]` without a matching `[` at byte {i}")),
            ']' => depth = 0,
            ',' if depth == 0 => {
                if start == i {
                    return Err(format!("empty host name before the `,` at byte {i}"));
                }
                items.push(&list[start..i]);
                start = i + 1;
            }
            c if c.is_whitespace() => return Err(format!("whitespace at byte {i}")),
            _ => {}
        }
    }
    if depth > 0 {
        return Err("`[` without a matching `]`".into());
    }
    if start < list.len() {
        items.push(&list[start..]);
    } else if !list.is_empty() {
        return Err("empty host name after the last `,`".into());
    }
    Ok(items)
}

/// `rack[1-2]-gpu[01,03]` → Text("rack"), Choice(1,2), Text("-gpu"), Choice(01,03).
/// Brackets are balanced and unnested here (checked by `split_items`).
fn parse_item(item: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = item;
    while let Some(open) = rest.find('[') {
        if open > 0 {
            parts.push(Part::Text(rest[..open].to_string()));
        }
        let close = open + rest[open..].find(']').expect("brackets are balanced");
        parts.push(Part::Choice(parse_ranges(&rest[open + 1..close])?));
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_string()));
    }
    Ok(parts)
}

/// `01-03,07` → `01 02 03 07`.
fn parse_ranges(body: &str) -> Result<Vec<String>, String> {
    if body.is_empty() {
        return Err("empty brackets `[]`".into());
    }
    let mut out = Vec::new();
    for range in body.split(',') {
        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
        let num = |s: &str| -> Result<u64, String> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("`{range}` in `[{body}]` is not a number or a range N-M"));
            }
            s.parse()
                .map_err(|_| format!("`{s}` in `[{body}]` is too large a number"))
        };
        let (a, b) = (num(lo)?, num(hi)?);
        if a > b {
            return Err(format!("reversed range `{range}` in `[{body}]`"));
        }
        if b - a >= MAX_HOSTS as u64 || out.len() + (b - a) as usize >= MAX_HOSTS {
            return Err(format!("`[{body}]` expands to more than {MAX_HOSTS} hosts"));
        }
        // Numbers at or above the low bound have at least its digits, so padding to its
        // width keeps `08-10` as 08 09 10 and leaves `8-10` unpadded.
        let width = lo.len();
        out.extend((a..=b).map(|n| format!("{n:0width$}")));
    }
    Ok(out)
}

fn expand_parts(parts: &[Part], prefix: String, out: &mut Vec<String>) {
    match parts.split_first() {
        None => out.push(prefix),
        Some((Part::Text(t), rest)) => expand_parts(rest, prefix + t, out),
        Some((Part::Choice(c), rest)) => {
            for alt in c {
                expand_parts(rest, format!("{prefix}{alt}"), out);
            }
        }
    }
}

/// `SLURM_TASKS_PER_NODE` syntax: `4(x2),3` → `[4, 4, 3]`.
pub fn expand_tasks_per_node(value: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for item in value.split(',') {
        let item = item.trim();
        let (count, repeat) = match item.split_once('(') {
            None => (item, "1"),
            Some((count, rest)) => {
                let times = rest
                    .strip_prefix('x')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| format!("`{item}` is neither N nor N(xM)"))?;
                (count, times)
            }
        };
        let count: usize = count
            .parse()
            .map_err(|_| format!("`{item}`: `{count}` is not a task count"))?;
        let repeat: usize = repeat
            .parse()
            .map_err(|_| format!("`{item}`: `{repeat}` is not a repeat count"))?;
        if repeat > MAX_HOSTS || out.len() + repeat > MAX_HOSTS {
            return Err(format!("more than {MAX_HOSTS} nodes"));
        }
        out.extend(std::iter::repeat_n(count, repeat));
    }
    Ok(out)
}

/// This task's place in the job step, from Slurm's variables (plus `MASTER_ADDR` and
/// `MASTER_PORT`, which win when set so a site can pin the rendezvous point).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlurmEnv {
    /// `SLURM_PROCID`.
    pub rank: usize,
    /// `SLURM_NTASKS`.
    pub world: usize,
    /// `SLURM_LOCALID`.
    pub local_rank: usize,
    /// Tasks on this node.
    pub local_world: usize,
    /// `SLURM_NODEID` (0 if unset).
    pub node_rank: usize,
    /// Hosts in the expanded nodelist.
    pub nodes: usize,
    /// `MASTER_ADDR`, else the first host of the nodelist (where task 0 runs).
    pub master_addr: String,
    pub master_port: u16,
    /// `SLURM_JOB_ID`.
    pub job_id: String,
    /// `SLURM_STEP_ID` (`0` if unset): which `srun` of the allocation this is.
    pub step_id: String,
    /// `SLURM_RESTART_COUNT` (0 if unset): how often Slurm requeued the job.
    pub restart_count: u32,
}

impl SlurmEnv {
    /// `Ok(None)` when `SLURM_PROCID` is unset (not a Slurm task).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<SlurmEnv>, SlurmError> {
        let Some(procid) = get("SLURM_PROCID") else {
            return Ok(None);
        };
        let context = || "SLURM_PROCID is set".to_string();
        let required = |var: &'static str| {
            get(var).ok_or_else(|| SlurmError::Missing {
                var,
                context: context(),
            })
        };
        let number = |var: &'static str, value: String| -> Result<usize, SlurmError> {
            value.trim().parse().map_err(|_| SlurmError::Invalid {
                var,
                reason: "not a non-negative integer".into(),
                value,
            })
        };
        let rank = number("SLURM_PROCID", procid)?;
        let world = number("SLURM_NTASKS", required("SLURM_NTASKS")?)?;
        if rank >= world {
            return Err(SlurmError::Invalid {
                var: "SLURM_PROCID",
                value: rank.to_string(),
                reason: format!("must be below SLURM_NTASKS={world}"),
            });
        }
        let local_rank = number("SLURM_LOCALID", required("SLURM_LOCALID")?)?;
        let node_rank = get("SLURM_NODEID").map(|v| number("SLURM_NODEID", v)).transpose()?;
        let job_id = required("SLURM_JOB_ID")?;

        // The step's nodes when srun ran on part of the allocation, else the job's.
        let (list_var, list) = ["SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST"]
            .into_iter()
            .find_map(|v| get(v).map(|l| (v, l)))
            .ok_or_else(|| SlurmError::Missing {
                var: "SLURM_NODELIST",
                context: context(),
            })?;
        let hosts = expand_nodelist(&list).map_err(|e| SlurmError::Invalid {
            var: list_var,
            value: list.clone(),
            reason: match e {
                SlurmError::Nodelist { reason, .. } => reason,
                other => other.to_string(),
            },
        })?;
        let nodes = hosts.len();

        let local_world = local_world(&get, rank, world, node_rank, nodes)?;
        if local_rank >= local_world {
            return Err(SlurmError::Invalid {
                var: "SLURM_LOCALID",
                value: local_rank.to_string(),
                reason: format!("must be below the {local_world} tasks on this node"),
            });
        }

        let master_addr = get("MASTER_ADDR")
            .filter(|a| !a.trim().is_empty())
            .unwrap_or_else(|| hosts[0].clone());
        let master_port = match get("MASTER_PORT") {
            Some(p) => p.trim().parse().map_err(|_| SlurmError::Invalid {
                var: "MASTER_PORT",
                value: p.clone(),
                reason: "not a port number".into(),
            })?,
            None => {
                let id: u64 = job_id.trim().parse().map_err(|_| SlurmError::Invalid {
                    var: "SLURM_JOB_ID",
                    value: job_id.clone(),
                    reason: "not a number (set MASTER_PORT to choose the rendezvous port)".into(),
                })?;
                BASE_PORT + (id % 1000) as u16
            }
        };
        let restart_count = match get("SLURM_RESTART_COUNT") {
            Some(v) => v.trim().parse().map_err(|_| SlurmError::Invalid {
                var: "SLURM_RESTART_COUNT",
                value: v.clone(),
                reason: "not a non-negative integer".into(),
            })?,
            None => 0,
        };
        Ok(Some(SlurmEnv {
            rank,
            world,
            local_rank,
            local_world,
            node_rank: node_rank.unwrap_or(0),
            nodes,
            master_addr,
            master_port,
            job_id: job_id.trim().to_string(),
            step_id: get("SLURM_STEP_ID").map_or_else(|| "0".into(), |v| v.trim().to_string()),
            restart_count,
        }))
    }

    pub fn from_env() -> Result<Option<SlurmEnv>, SlurmError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }
}

/// Tasks on this task's node: `SLURM_NTASKS_PER_NODE` when set (`--ntasks-per-node`), else
/// this node's entry of `SLURM_STEP_TASKS_PER_NODE` / `SLURM_TASKS_PER_NODE` (by
/// `SLURM_NODEID`, or, without it, by counting tasks node by node as the default block
/// distribution places them), else an even split of the tasks over the nodes.
fn local_world(
    get: &impl Fn(&str) -> Option<String>,
    rank: usize,
    world: usize,
    node_rank: Option<usize>,
    nodes: usize,
) -> Result<usize, SlurmError> {
    if let Some(v) = get("SLURM_NTASKS_PER_NODE") {
        let n = v.trim().parse::<usize>().ok().filter(|&n| n > 0);
        return n.ok_or(SlurmError::Invalid {
            var: "SLURM_NTASKS_PER_NODE",
            value: v,
            reason: "not a positive integer".into(),
        });
    }
    for var in ["SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"] {
        let Some(v) = get(var) else { continue };
        let invalid = |reason: String| SlurmError::Invalid {
            var,
            value: v.clone(),
            reason,
        };
        let per_node = expand_tasks_per_node(&v).map_err(invalid)?;
        let n = match node_rank {
            Some(node) => *per_node
                .get(node)
                .ok_or_else(|| invalid(format!("no entry for SLURM_NODEID={node}")))?,
            None => {
                let mut first = 0;
                let mut found = None;
                for &n in &per_node {
                    if rank < first + n {
                        found = Some(n);
                        break;
                    }
                    first += n;
                }
                found.ok_or_else(|| invalid(format!("fewer tasks than SLURM_PROCID={rank}")))?
            }
        };
        if n == 0 {
            return Err(invalid("zero tasks on this node".into()));
        }
        return Ok(n);
    }
    if nodes <= 1 {
        return Ok(world);
    }
    if world.is_multiple_of(nodes) {
        Ok(world / nodes)
    } else {
        Err(SlurmError::Missing {
            var: "SLURM_TASKS_PER_NODE",
            context: format!("{world} tasks do not split evenly over {nodes} nodes"),
        })
    }
}
