//! Shared pieces of the benchmarks: timing a guest boot from process start, fio jobs and reports.

pub mod boottrace;
pub mod fcapi;
pub mod fio;
pub mod guestfio;
pub mod peers;
pub mod streams;
pub mod timing;
pub mod uefi;

/// Runs `script` in the test host (at most an hour), prints what it printed, and fails when it
/// did.
pub fn run_printed(
    host: &lightbyte_tests::testhost::Host,
    name: &str,
    script: &str,
) -> anyhow::Result<()> {
    let out = host.run(name, script, std::time::Duration::from_secs(3600))?;
    print!("{}", out.output);
    if out.status != 0 {
        anyhow::bail!("the benchmark failed ({})", out.status);
    }
    Ok(())
}
