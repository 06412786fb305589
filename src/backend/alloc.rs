//! `alloc`: acquires the lease and programs nothing.

use async_trait::async_trait;

use super::{Backend, BackendContext, BackendError, BackendType, Publish, ReconcileReport};
use crate::subnet::{Lease, PeerSet};

pub struct AllocBackend {
    ctx: BackendContext,
}

impl AllocBackend {
    pub fn new(ctx: BackendContext) -> Self {
        AllocBackend { ctx }
    }
}

#[async_trait]
impl Backend for AllocBackend {
    async fn prepare(&mut self) -> Result<Publish, BackendError> {
        Ok(Publish {
            backend_type: BackendType::Alloc.name().into(),
            backend_data: None,
            backend_v6_data: None,
            mtu: self.ctx.ext.mtu,
        })
    }

    async fn lease_acquired(&mut self, _own: &Lease) -> Result<(), BackendError> {
        Ok(())
    }

    async fn reconcile(&mut self, _peers: &PeerSet) -> Result<ReconcileReport, BackendError> {
        Ok(ReconcileReport::default())
    }
}
