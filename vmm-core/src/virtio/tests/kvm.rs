//! The transport on a real KVM VM.
