//! The subnet file (`/run/flannel/subnet.env`): written atomically, read back at start.
