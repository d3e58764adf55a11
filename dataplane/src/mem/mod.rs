//! Guest memory as the switch reaches it: the frontend's regions mapped and translated
//! (table.rs), the dirty-page log of live migration, SIGBUS containment for a frontend that
//! shrinks its files (sigbus.rs), segment lists of translated buffers (seg.rs) and the copies
//! between them (copy.rs). Tables are built on control; PMDs use them through their rings.

pub mod copy;
pub mod seg;
pub mod sigbus;
pub mod table;
