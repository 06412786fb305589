//! Acquiring and renewing our own lease, in flannel's order: re-use the lease that already
//! carries our public IP, else the subnet we had before, else a random free one.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use rand::seq::SliceRandom;

use super::alloc;
use super::etcd::{EtcdError, Listing, Registry};
use super::lease::{Lease, LeaseAttrs, SubnetKey};
use crate::config::{FamilyConfig, NetworkConfig};
use crate::netlink::Net;

/// Candidates tried per listing, as flannel does.
const CANDIDATES: usize = 100;
/// Listings before giving up when every candidate keeps being taken by racing hosts.
const MAX_ROUNDS: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error(
        "no free subnet in network {network}: all {total} subnets of /{len} between \
         {min} and {max} are leased or reserved"
    )]
    NoFreeSubnet {
        network: String,
        len: u8,
        total: u128,
        min: String,
        max: String,
    },
    #[error("gave up after {0} rounds: other hosts took every candidate subnet first")]
    Contended(usize),
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

impl AcquireError {
    /// Names the IPv4 range when IPv4 is enabled, else the IPv6 one.
    fn no_free(cfg: &NetworkConfig) -> Self {
        fn of<N: Net>(f: &FamilyConfig<N>) -> AcquireError {
            AcquireError::NoFreeSubnet {
                network: f.network.to_string(),
                len: f.subnet_len,
                total: f.subnet_count(),
                min: f.subnet_min.to_string(),
                max: f.subnet_max.to_string(),
            }
        }
        match (&cfg.v4, &cfg.v6) {
            (Some(f), _) => of(f),
            (None, Some(f)) => of(f),
            (None, None) => AcquireError::NoFreeSubnet {
                network: String::new(),
                len: 0,
                total: 0,
                min: String::new(),
                max: String::new(),
            },
        }
    }
}

/// What we ask for.
#[derive(Debug, Clone)]
pub struct AcquireRequest {
    pub attrs: LeaseAttrs,
    /// A subnet to prefer when free (from the old subnet file, or the lease we just lost).
    pub prefer: Option<SubnetKey>,
    pub ttl: Duration,
}

impl AcquireRequest {
    fn is_ours(&self, lease: &Lease) -> bool {
        let same_v4 = |ip: Option<Ipv4Addr>| ip.is_some() && ip == self.attrs.public_ip;
        let same_v6 = |ip: Option<Ipv6Addr>| ip.is_some() && ip == self.attrs.public_ipv6;
        if self.attrs.public_ip.is_some() {
            same_v4(lease.attrs.public_ip)
        } else {
            same_v6(lease.attrs.public_ipv6)
        }
    }
}

/// Whether `key` shares a subnet (of either family) with any key in `taken`.
pub fn overlaps(taken: &HashSet<SubnetKey>, key: &SubnetKey) -> bool {
    taken.iter().any(|t| {
        (key.ipv4.is_some() && t.ipv4 == key.ipv4) || (key.ipv6.is_some() && t.ipv6 == key.ipv6)
    })
}

/// Acquires a lease. On success the key holds `req.attrs` with a fresh etcd lease of `req.ttl`
/// (or none, when we re-use a reservation made for our public IP).
pub async fn acquire(
    reg: &Registry,
    cfg: &NetworkConfig,
    req: &AcquireRequest,
) -> Result<Lease, AcquireError> {
    acquire_and_list(reg, cfg, req)
        .await
        .map(|(lease, _)| lease)
}

/// [`acquire`], also returning the listing the choice was made from (every lease but the one
/// just written), so that a watcher can start from it instead of listing again.
pub async fn acquire_and_list(
    reg: &Registry,
    cfg: &NetworkConfig,
    req: &AcquireRequest,
) -> Result<(Lease, Listing), AcquireError> {
    let etcd_lease = reg.grant(req.ttl).await?;
    let result = acquire_with(reg, cfg, req, etcd_lease).await;
    let used = matches!(&result, Ok((l, _)) if l.etcd_lease == Some(etcd_lease));
    if !used {
        // Best effort: an unused grant would only expire on its own.
        let _ = reg.revoke(etcd_lease).await;
    }
    result
}

async fn acquire_with(
    reg: &Registry,
    cfg: &NetworkConfig,
    req: &AcquireRequest,
    etcd_lease: i64,
) -> Result<(Lease, Listing), AcquireError> {
    for _round in 0..MAX_ROUNDS {
        let listing = reg.list_subnets().await?;

        // 1. A lease already carrying our public IP: refresh it in place.
        if let Some(existing) = listing
            .leases
            .iter()
            .find(|l| req.is_ours(l) && l.key.fits(cfg))
        {
            let new_lease = (!existing.is_reservation()).then_some(etcd_lease);
            match reg
                .replace_if_unchanged(existing.key, existing.revision, &req.attrs, new_lease)
                .await?
            {
                Some(lease) => {
                    if let Some(old) = existing.etcd_lease {
                        // The key now hangs on the new etcd lease; the old one only holds
                        // nothing, and revoking it keeps etcd's lease table small.
                        let _ = reg.revoke(old).await;
                    }
                    return Ok((lease, listing));
                }
                None => continue,
            }
        }

        let taken: HashSet<SubnetKey> = listing
            .leases
            .iter()
            .map(|l| l.key)
            .chain(listing.malformed.iter().filter_map(|(k, _, _)| {
                k.strip_prefix(&reg.subnets_prefix())
                    .and_then(|s| s.parse().ok())
            }))
            .collect();

        // 2. The subnet we had before, when it is still free and fits the config.
        if let Some(prefer) = req.prefer.filter(|k| k.fits(cfg) && !overlaps(&taken, k)) {
            if let Some(lease) = create(reg, prefer, req, etcd_lease).await? {
                return Ok((lease, listing));
            }
        }

        // 3. A random free subnet; a lost race moves on to the next candidate.
        let mut candidates = alloc::random_free(cfg, &taken, CANDIDATES, &mut rand::rng());
        if candidates.is_empty() {
            return Err(AcquireError::no_free(cfg));
        }
        candidates.shuffle(&mut rand::rng());
        for key in candidates {
            if let Some(lease) = create(reg, key, req, etcd_lease).await? {
                return Ok((lease, listing));
            }
        }
    }
    Err(AcquireError::Contended(MAX_ROUNDS))
}

/// Creates `key` if absent, and keeps it only if no older key shares one of its subnets (a
/// dual-stack race the key comparison cannot catch); `None` when the subnet went to someone else.
async fn create(
    reg: &Registry,
    key: SubnetKey,
    req: &AcquireRequest,
    etcd_lease: i64,
) -> Result<Option<Lease>, AcquireError> {
    let Some(lease) = reg
        .create_if_absent(key, &req.attrs, Some(etcd_lease))
        .await?
    else {
        return Ok(None);
    };
    // A single-family key is its subnet, so the create-if-absent check was exact; only a
    // dual-stack key can share half of itself with a key the check could not see.
    let dual_stack = key.ipv4.is_some() && key.ipv6.is_some();
    if !dual_stack || reg.holds_alone(&lease).await? {
        return Ok(Some(lease));
    }
    tracing::info!("lost a race for a subnet of {key}: another host created it first");
    reg.delete_if_unchanged(&lease).await?;
    Ok(None)
}

/// Outcome of a renewal attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Refreshed to the full TTL.
    Renewed { ttl_secs: i64 },
    /// The etcd lease was gone: the key expired and must be acquired again.
    Expired,
    /// The lease does not expire (an etcd reservation; a lease the registry holds for as
    /// long as it exists).
    NotNeeded,
}

pub async fn renew(reg: &Registry, lease: &Lease) -> Result<Renewal, EtcdError> {
    let Some(id) = lease.etcd_lease else {
        return Ok(Renewal::NotNeeded);
    };
    let ttl = reg.keep_alive_once(id).await?;
    Ok(if ttl > 0 {
        Renewal::Renewed { ttl_secs: ttl }
    } else {
        Renewal::Expired
    })
}
