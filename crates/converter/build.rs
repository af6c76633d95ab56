//! Links Debian's libext2fs and libcom_err dynamically (LGPL: never statically),
//! asking pkg-config where they are. No bindgen: the declarations are in
//! `src/ffi.rs`, checked against the C headers by the crate's layout tests.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    let out = Command::new("pkg-config")
        .args(["--libs", "ext2fs", "com_err"])
        .output();
    let libs = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => {
            println!(
                "cargo:warning=pkg-config could not find ext2fs/com_err (install libext2fs-dev); assuming the default library path"
            );
            "-lext2fs -lcom_err".to_string()
        }
    };
    for tok in libs.split_whitespace() {
        if let Some(dir) = tok.strip_prefix("-L") {
            println!("cargo:rustc-link-search=native={dir}");
        } else if let Some(lib) = tok.strip_prefix("-l") {
            println!("cargo:rustc-link-lib=dylib={lib}");
        }
    }
    let cflags = Command::new("pkg-config")
        .args(["--cflags", "ext2fs", "com_err"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    // For the layout tests, which compile a tiny C program against the headers.
    println!("cargo:rustc-env=OBD_EXT2FS_CFLAGS={cflags}");
}
