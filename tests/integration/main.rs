mod apns;
mod cli;
mod dedup;
mod fakes_selftest;
mod fcm;
mod lifecycle;
mod notify;
mod support;
