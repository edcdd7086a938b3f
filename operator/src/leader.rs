//! Leader election through a coordination.k8s.io Lease, with client-go's guarantee: a leader
//! that cannot renew stops **before** its Lease can be taken by another replica.
//!
//! Acquiring and renewing is `kube-lease-manager`'s (server-side apply, conflict detection, a
//! renewal `grace` before expiry). That crate keeps reporting "leader" while its renewals fail,
//! so [`LeaderElection::hold`] adds the renew deadline: shortly after each renewal is due, it
//! reads the Lease back (bounded by a timeout) and steps down unless the renewal is there.
//! With `D` the duration and `G` the grace (a third of `D`): renewals are due at `D - G` after
//! the last one, the check runs at `D - 3G/4`, and a leader that could not confirm its
//! renewal stops by `D - G/2` (10 s of a 15 s Lease, as client-go's renew deadline), leaving
//! `G/2` for clock skew before any other replica sees the Lease expire at `D`.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};

pub struct LeaderElection {
    manager: LeaseManager,
    leases: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    grace: Duration,
}

/// How a leader's term ended.
#[derive(Debug, thiserror::Error)]
pub enum LeadershipLost {
    #[error("another replica took the Lease {0}")]
    TakenOver(String),
    #[error("the Lease {name} could not be confirmed renewed before it expires ({detail}); stepping down so no two replicas lead")]
    NotRenewed { name: String, detail: String },
}

impl LeaderElection {
    /// Creates the Lease if it is missing; fails (rather than waiting forever) when the API
    /// refuses, e.g. a missing RBAC rule for leases.
    pub async fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        lease_duration: Duration,
    ) -> Result<Self, LeaseManagerError> {
        let seconds = lease_duration.as_secs().max(3);
        let grace = (seconds / 3).max(1);
        let manager = LeaseManagerBuilder::new(client.clone(), name)
            .with_namespace(namespace)
            .with_identity(identity)
            .with_field_manager(format!("granary-operator/{identity}"))
            .with_duration(seconds)
            .with_grace(grace)
            .build()
            .await?;
        Ok(LeaderElection {
            manager,
            leases: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            duration: Duration::from_secs(seconds),
            grace: Duration::from_secs(grace),
        })
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Waits until this replica leads.
    pub async fn acquire(&self) {
        loop {
            match self.manager.changed().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, lease = %self.name, "leader election failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Renews the Lease until leadership ends, and says why. The caller stops reconciling
    /// (the process exits so a new term starts clean).
    pub async fn hold(&self) -> LeadershipLost {
        let renewals = async {
            loop {
                match self.manager.changed().await {
                    Ok(false) => return LeadershipLost::TakenOver(self.name.clone()),
                    Ok(true) => {}
                    Err(e) => {
                        // The manager retries on the next call; the deadline below decides
                        // whether there is time for that.
                        tracing::warn!(error = %e, lease = %self.name, "renewing the leader Lease failed");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        };
        tokio::select! {
            lost = renewals => lost,
            lost = self.renew_deadline() => lost,
        }
    }

    /// Returns when the Lease cannot be confirmed ours for long enough.
    async fn renew_deadline(&self) -> LeadershipLost {
        let mut valid_until = SystemTime::now() + self.duration;
        loop {
            let check_at = valid_until - self.grace * 3 / 4;
            if let Ok(wait) = check_at.duration_since(SystemTime::now()) {
                tokio::time::sleep(wait).await;
            }
            let not_renewed = |detail: String| LeadershipLost::NotRenewed {
                name: self.name.clone(),
                detail,
            };
            let lease = match tokio::time::timeout(self.grace / 4, self.leases.get(&self.name)).await {
                Ok(Ok(lease)) => lease,
                Ok(Err(e)) => return not_renewed(format!("reading it: {e}")),
                Err(_) => return not_renewed(format!("reading it took longer than {:?}", self.grace / 4)),
            };
            let spec = lease.spec.unwrap_or_default();
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                return LeadershipLost::TakenOver(self.name.clone());
            }
            // renewTime was written by this process, with this clock.
            let renewed = spec.renew_time.map(|t| SystemTime::from(t.0));
            let duration = spec
                .lease_duration_seconds
                .map_or(self.duration, |s| Duration::from_secs(s.max(0) as u64));
            match renewed.map(|r| r + duration) {
                Some(until) if until > SystemTime::now() + self.grace / 2 => valid_until = until,
                _ => return not_renewed("its renewTime is not recent".into()),
            }
        }
    }

    /// Gives the Lease up (on shutdown), so a standby replica leads at once instead of after
    /// the Lease expires.
    pub async fn release(&self) {
        if let Err(e) = self.manager.release().await {
            tracing::warn!(error = %e, lease = %self.name, "releasing the leader Lease failed; it expires by itself");
        }
    }
}
