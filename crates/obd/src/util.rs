//! Small helpers shared by the subcommands.

use anyhow::{bail, Context, Result};

/// Parses sizes like `4096`, `4K`, `4KiB`, `64M`, `1G`, `1GiB` (binary units).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("`{s}` is not a size"))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        u => bail!("`{s}`: unknown size unit `{u}` (use K, M, G or T)"),
    };
    n.checked_mul(mult)
        .with_context(|| format!("`{s}` is too large"))
}

/// What to do about an error whose cause is the machine rather than the
/// command: a full disk (ENOSPC anywhere in the chain, or its text from a
/// library that flattened it).
pub fn hint(e: &anyhow::Error) -> Option<String> {
    let enospc = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc_enospc()))
            || c.to_string().contains("No space left on device")
    });
    enospc.then(|| {
        "the disk is full: free space on the file system named above, or write \
         elsewhere (`--tmp-dir`, `-o`, the service config's `[cache] dir`); \
         `obd doctor` shows the free space where obd writes"
            .to_string()
    })
}

/// `ENOSPC`.
fn libc_enospc() -> i32 {
    rustix::io::Errno::NOSPC.raw_os_error()
}

/// Human-readable byte count.
pub fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", U[i])
    }
}

/// SHA-256 of everything `r` yields, as lower-case hex.
pub fn sha256_hex(mut r: impl std::io::Read) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Prints a JSON object pretty-printed, or as `key: value` lines.
pub fn print_object(v: &serde_json::Value, as_json: bool) {
    match v.as_object() {
        Some(m) if !as_json => {
            for (k, val) in m {
                println!("{k}: {val}");
            }
        }
        _ => println!(
            "{}",
            serde_json::to_string_pretty(v).expect("JSON values serialise")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn sizes() {
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("32KiB").unwrap(), 32768);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("4X").is_err());
        assert!(parse_size("K").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }
}
