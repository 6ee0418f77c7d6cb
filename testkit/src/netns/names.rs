//! Names, subnets and leftovers of harness instances, as plain functions.
//!
//! A harness instance owns one /24 of the benchmarking range 198.18.0.0/15 (RFC 2544: never
//! routed on the internet, so nothing here can shadow a real address), numbered 0..512. Its
//! namespaces are named `gtn<subnet>-<owner>-<role>`: `owner` is the pid of the process that
//! made them (or `sh` for `scripts/netns-cluster.sh`, which outlives its own process), `role`
//! is `sw` for the switch namespace holding the bridge or `h<index>` for a host. The names
//! are the claim: a subnet is in use exactly while a namespace carrying its number exists, so
//! there is no second record to go stale. The script parses and builds the same names; keep
//! the two in step.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

/// Every namespace the harness makes starts with this.
pub const PREFIX: &str = "gtn";
/// /24 subnets in 198.18.0.0/15.
pub const SUBNETS: u16 = 512;
/// Hosts per instance: addresses .1 to .250 of its /24 (the rest stays unused).
pub const MAX_HOSTS: usize = 250;
/// The owner field of namespaces made by `scripts/netns-cluster.sh`.
pub const SCRIPT_OWNER: &str = "sh";

/// Who made a namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// A harness in a test process: its namespaces are leftovers once the process is gone.
    Pid(u32),
    /// `scripts/netns-cluster.sh`: removed only by `--down`.
    Script,
}

/// What a namespace is for within its instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The namespace holding the bridge and the switch ends of every host's cable.
    Switch,
    /// Host number `index` (its address is `.index+1`).
    Host(usize),
}

/// A parsed namespace name of the harness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NsName {
    pub subnet: u16,
    pub owner: Owner,
    pub role: Role,
}

impl NsName {
    pub fn render(&self) -> String {
        let owner = match self.owner {
            Owner::Pid(pid) => pid.to_string(),
            Owner::Script => SCRIPT_OWNER.to_string(),
        };
        let role = match self.role {
            Role::Switch => "sw".to_string(),
            Role::Host(i) => format!("h{i}"),
        };
        format!("{PREFIX}{}-{owner}-{role}", self.subnet)
    }

    /// The name `render` gave, or `None` for anything else (other tools' namespaces, or
    /// numbers written in a way `render` never writes them).
    pub fn parse(name: &str) -> Option<NsName> {
        let rest = name.strip_prefix(PREFIX)?;
        let mut fields = rest.split('-');
        let (subnet, owner, role) = (fields.next()?, fields.next()?, fields.next()?);
        if fields.next().is_some() {
            return None;
        }
        let subnet: u16 = canonical(subnet)?;
        if subnet >= SUBNETS {
            return None;
        }
        let owner = match owner {
            SCRIPT_OWNER => Owner::Script,
            pid => Owner::Pid(canonical(pid)?),
        };
        let role = match role {
            "sw" => Role::Switch,
            host => {
                let index: usize = canonical(host.strip_prefix('h')?)?;
                if index >= MAX_HOSTS {
                    return None;
                }
                Role::Host(index)
            }
        };
        Some(NsName { subnet, owner, role })
    }
}

/// A decimal number as `to_string` writes it (no sign, no leading zeros), so that parsing
/// and rendering are inverse and one namespace has one name.
fn canonical<T: std::str::FromStr + ToString>(s: &str) -> Option<T> {
    let v: T = s.parse().ok()?;
    (v.to_string() == s).then_some(v)
}

/// The network address of subnet `subnet` (198.18.0.0 + 256 × subnet).
pub fn network(subnet: u16) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (u32::from(subnet) << 8))
}

/// Host `index`'s address in subnet `subnet`: `.index+1`.
pub fn host_addr(subnet: u16, index: usize) -> Ipv4Addr {
    let host = u32::try_from(index.min(MAX_HOSTS - 1) + 1).unwrap_or(1);
    Ipv4Addr::from(u32::from(network(subnet)) + host)
}

/// The name of host `index`'s port on the switch (its end of the veth pair).
pub fn switch_port(index: usize) -> String {
    format!("p{index}")
}

/// The first subnet not in `used`, looking from `start` round the range (starting at a
/// per-process offset keeps instances that run one after another off each other's numbers).
pub fn pick_subnet(used: &BTreeSet<u16>, start: u16) -> Option<u16> {
    (0..SUBNETS)
        .map(|i| (start % SUBNETS + i) % SUBNETS)
        .find(|s| !used.contains(s))
}

/// The subnets that `names` (the machine's namespaces) hold.
pub fn used_subnets<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeSet<u16> {
    names.into_iter().filter_map(NsName::parse).map(|n| n.subnet).collect()
}

/// The namespaces among `names` left by harness processes that are gone (`alive` says
/// whether a pid still runs). The script's namespaces are never leftovers: nothing dies
/// with them, `--down` removes them.
pub fn leftovers<'a>(names: impl IntoIterator<Item = &'a str>, alive: impl Fn(u32) -> bool) -> Vec<String> {
    names
        .into_iter()
        .filter(|name| match NsName::parse(name) {
            Some(NsName {
                owner: Owner::Pid(pid), ..
            }) => !alive(pid),
            _ => false,
        })
        .map(str::to_string)
        .collect()
}

/// A host name the harness accepts: a DNS label of lower-case letters, digits and inner
/// hyphens, at most 63 bytes (what `sethostname` and resolvers take without surprises).
pub fn check_hostname(name: &str) -> Result<(), String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if name.is_empty() || name.len() > 63 || !ok_chars || name.starts_with('-') || name.ends_with('-') {
        return Err(format!(
            "host name `{name}` must be 1 to 63 lower-case letters, digits and inner hyphens"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_render_as_the_script_builds_them() {
        let host = NsName {
            subnet: 17,
            owner: Owner::Pid(4242),
            role: Role::Host(2),
        };
        assert_eq!(host.render(), "gtn17-4242-h2");
        let switch = NsName {
            subnet: 511,
            owner: Owner::Script,
            role: Role::Switch,
        };
        assert_eq!(switch.render(), "gtn511-sh-sw");
    }

    #[test]
    fn foreign_and_non_canonical_names_are_not_ours() {
        for name in [
            "",
            "gtn",
            "gtn1-2",
            "gtn1-2-h3-x",
            "gtn01-2-sw",
            "gtn1-02-sw",
            "gtn1-2-h03",
            "gtn512-2-sw",
            "gtn1-2-h250",
            "gtn1-+2-sw",
            "gtn1-2-s",
            "gtn1-2-h",
            "gtn-1-2-sw",
            "cni-1234",
            "gtn1-bob-sw",
        ] {
            assert_eq!(NsName::parse(name), None, "{name}");
        }
    }

    #[test]
    fn addresses_cover_the_benchmarking_range() {
        assert_eq!(network(0), Ipv4Addr::new(198, 18, 0, 0));
        assert_eq!(network(255), Ipv4Addr::new(198, 18, 255, 0));
        assert_eq!(network(256), Ipv4Addr::new(198, 19, 0, 0));
        assert_eq!(network(511), Ipv4Addr::new(198, 19, 255, 0));
        assert_eq!(host_addr(3, 0), Ipv4Addr::new(198, 18, 3, 1));
        assert_eq!(host_addr(300, MAX_HOSTS - 1), Ipv4Addr::new(198, 19, 44, 250));
    }

    #[test]
    fn subnets_are_picked_round_the_range_and_run_out() {
        let used: BTreeSet<u16> = [5, 6, 511].into();
        assert_eq!(pick_subnet(&used, 5), Some(7));
        assert_eq!(pick_subnet(&used, 511), Some(0));
        assert_eq!(pick_subnet(&used, 1000), Some(488));
        let all: BTreeSet<u16> = (0..SUBNETS).collect();
        assert_eq!(pick_subnet(&all, 3), None);
    }

    #[test]
    fn leftovers_are_dead_owners_only() {
        let names = [
            "gtn1-100-sw",
            "gtn1-100-h0",
            "gtn2-200-sw",
            "gtn3-sh-h0",
            "other",
            "gtn4-0100-sw",
        ];
        let gone = leftovers(names, |pid| pid == 200);
        assert_eq!(gone, ["gtn1-100-sw", "gtn1-100-h0"]);
        assert_eq!(used_subnets(names), [1, 2, 3].into());
    }

    #[test]
    fn hostnames() {
        for good in ["h0", "head", "n-1", "a"] {
            assert_eq!(check_hostname(good), Ok(()), "{good}");
        }
        let long = "a".repeat(64);
        for bad in ["", "-a", "a-", "H0", "a.b", "a_b", long.as_str()] {
            assert!(check_hostname(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn parse_inverts_render(subnet in 0..SUBNETS, pid in proptest::option::of(any::<u32>()),
                                host in proptest::option::of(0..MAX_HOSTS)) {
            let name = NsName {
                subnet,
                owner: pid.map_or(Owner::Script, Owner::Pid),
                role: host.map_or(Role::Switch, Role::Host),
            };
            prop_assert_eq!(NsName::parse(&name.render()), Some(name));
        }

        #[test]
        fn parse_never_panics_and_accepts_only_what_it_renders(s in "[gtn0-9shwp+-]{0,16}") {
            if let Some(n) = NsName::parse(&s) {
                prop_assert_eq!(n.render(), s);
            }
        }
    }
}
