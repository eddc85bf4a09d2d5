//! Where an outbound fetch may go. Plugin sources name hosts from outside;
//! the functions run inside the VPC, so a source must never make them talk
//! to an address that is not public (loopback, private, link-local, CGNAT,
//! unique-local, multicast, ...), whatever a hostname resolves to and
//! wherever a redirect points. Optionally only listed hosts are fetched
//! from. The adapter applies these rules to every hop and connects only to
//! the addresses that passed (no second lookup to rebind).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::domain::error::{Error, ErrorKind};

/// The rules of one deployment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchPolicy {
    /// When not empty, the only hosts fetched from (lowercase, exact).
    pub allowed_hosts: Vec<String>,
    /// Test-only: non-public addresses a test's own server listens on.
    /// Never set in a deployment (template.yaml has no such parameter).
    pub test_allowed_addresses: Vec<IpAddr>,
}

/// Why an address is not public, or `None` when it is.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    let rule = if ip.is_unspecified() || a == 0 {
        "unspecified (0.0.0.0/8)"
    } else if ip.is_loopback() {
        "loopback"
    } else if ip.is_private() {
        "private (RFC 1918)"
    } else if ip.is_link_local() {
        "link-local (169.254.0.0/16, instance metadata)"
    } else if a == 100 && (64..128).contains(&b) {
        "carrier-grade NAT (100.64.0.0/10)"
    } else if ip.is_multicast() {
        "multicast"
    } else if ip.is_broadcast() || a >= 240 {
        "reserved (240.0.0.0/4)"
    } else if ip.is_documentation() {
        "documentation"
    } else if a == 198 && (18..20).contains(&b) {
        "benchmarking (198.18.0.0/15)"
    } else if a == 192 && b == 0 && c == 0 {
        "IETF protocol assignments (192.0.0.0/24)"
    } else {
        return None;
    };
    Some(rule)
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    // An IPv4 address in IPv6 clothing is judged as the IPv4 address.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return non_public_v4(v4);
    }
    let s = ip.segments();
    if s[0] == 0x64 && s[1] == 0xff9b {
        // NAT64: the embedded IPv4 address is where it goes.
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        return non_public_v4(v4);
    }
    let rule = if ip.is_unspecified() {
        "unspecified"
    } else if ip.is_loopback() {
        "loopback"
    } else if (s[0] & 0xfe00) == 0xfc00 {
        "unique-local (fc00::/7)"
    } else if (s[0] & 0xffc0) == 0xfe80 {
        "link-local (fe80::/10)"
    } else if ip.is_multicast() {
        "multicast"
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        "documentation"
    } else if s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == 0 && s[4] == 0 && s[5] == 0 {
        "IPv4-compatible (deprecated)"
    } else if s[0] == 0x2002 || (s[0] == 0x2001 && s[1] == 0) {
        "6to4 / Teredo tunnel"
    } else if (s[0] & 0xe000) != 0x2000 {
        "not global unicast (outside 2000::/3)"
    } else {
        return None;
    };
    Some(rule)
}

/// The refusal: a 403 naming the rule, never what the target would have said.
pub fn refused(host: &str, rule: &str) -> Error {
    Error::new(
        ErrorKind::Forbidden,
        format!("fetching from {host} is refused: {rule}"),
    )
    .with_field("rule", serde_json::json!(rule))
}

impl FetchPolicy {
    /// 403 unless `host` may be fetched from (the allowed-hosts list, and
    /// an address literal must be public).
    pub fn check_host(&self, host: &str) -> Result<(), String> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if !self.allowed_hosts.is_empty()
            && !self
                .allowed_hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(bare))
        {
            return Err("not in the allowed hosts".into());
        }
        if let Ok(ip) = bare.parse::<IpAddr>() {
            self.check_ip(ip)?;
        }
        Ok(())
    }

    /// Whether a resolved (or literal) address may be connected to.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), String> {
        match non_public(ip) {
            Some(_) if self.test_allowed_addresses.contains(&ip) => Ok(()),
            Some(rule) => Err(format!("{ip} is not a public address ({rule})")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_pass() {
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "192.0.0.170",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2001:db8::1",
            "::127.0.0.1",
            "2002:7f00:1::",
            "2001:0:4136:e378::1",
        ] {
            let ip: IpAddr = bad.parse().unwrap();
            assert!(non_public(ip).is_some(), "{bad}");
        }
        for good in [
            "8.8.8.8",
            "140.82.112.3",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            let ip: IpAddr = good.parse().unwrap();
            assert_eq!(non_public(ip), None, "{good}");
        }
    }

    #[test]
    fn hosts_and_the_test_allowance() {
        let p = FetchPolicy::default();
        assert!(p.check_host("127.0.0.1").is_err());
        assert!(p.check_host("[::1]").is_err());
        assert!(
            p.check_host("example.com").is_ok(),
            "names are checked once resolved"
        );
        let listed = FetchPolicy {
            allowed_hosts: vec!["codeload.github.com".into(), "api.github.com".into()],
            ..Default::default()
        };
        assert!(listed.check_host("API.github.com").is_ok());
        assert!(listed.check_host("evil.example").is_err());
        let test = FetchPolicy {
            test_allowed_addresses: vec!["127.0.0.1".parse().unwrap()],
            ..Default::default()
        };
        assert!(test.check_ip("127.0.0.1".parse().unwrap()).is_ok());
        assert!(test.check_ip("127.0.0.2".parse().unwrap()).is_err());
        assert!(test.check_ip("10.0.0.1".parse().unwrap()).is_err());
        let e = refused("h", "x");
        assert_eq!((e.status(), e.fields["rule"].as_str()), (403, Some("x")));
    }
}
