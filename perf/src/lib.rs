//! ringswitch's measuring tools as a library: a vhost-user frontend (`frontend`) that plays
//! guests against any backend, for the hostile-guest test and the traffic tool.

pub mod frontend;
