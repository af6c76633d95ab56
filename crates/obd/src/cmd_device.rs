//! `obd device`: serve images as block devices (TCMU, FUSE + loop).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use obd_device::service::{call, list, Op, Service};
use obd_device::state::{Root, DEFAULT_ROOT};

#[derive(Subcommand, Debug)]
pub enum DeviceCmd {
    /// Run the device service in the foreground (control socket `<root>/obd.sock`).
    ///
    /// At start it adopts the devices whose workers still run and cleans up the
    /// rest. Devices outlive the service: stopping or killing it leaves them up.
    Serve {
        /// State directory.
        #[arg(long, default_value = DEFAULT_ROOT)]
        root: PathBuf,
    },
    /// Attach an image; prints the block device path as the last line.
    Attach {
        /// State directory of the running service.
        #[arg(long, default_value = DEFAULT_ROOT)]
        root: PathBuf,
        /// The image's config.v1.json. With `upper` set, the device is read-write.
        #[arg(long)]
        config: PathBuf,
        /// tcmu (needs target_core_user + tcm_loop) or fuse (FUSE file + loop device).
        #[arg(long, default_value = "fuse")]
        frontend: String,
        /// Mount the device's filesystem here (read-only for read-only images).
        #[arg(long)]
        mount: Option<PathBuf>,
        /// Device id (default: the first free `dN`).
        #[arg(long)]
        id: Option<String>,
    },
    /// Unmount (if the service mounted it) and detach a device, by id, device
    /// node or mount point.
    Detach {
        /// State directory of the running service.
        #[arg(long, default_value = DEFAULT_ROOT)]
        root: PathBuf,
        /// Id, /dev path or mount point.
        device: String,
    },
    /// List devices.
    List {
        /// State directory.
        #[arg(long, default_value = DEFAULT_ROOT)]
        root: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move devices to new workers one at a time while containers keep using
    /// them: run after replacing the obd (or obd-snapshotter) binary, so the
    /// devices run the new one. Each worker makes its writes durable and hands
    /// its device over; the supervisor (`obd device serve`, or obd-snapshotter
    /// on its root) starts the new worker. Prints each device and how long it
    /// took.
    Upgrade {
        /// State directory (the snapshotter's root for its devices).
        #[arg(long, default_value = DEFAULT_ROOT)]
        root: PathBuf,
        /// Device ids (default: all).
        devices: Vec<String>,
        /// Longest wait for one device's new worker, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Serve one device (started by the service; not for direct use).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        id: String,
    },
}

pub fn run(cmd: DeviceCmd) -> Result<()> {
    match cmd {
        DeviceCmd::Serve { root } => {
            let exe = std::env::current_exe().context("locating the obd binary")?;
            let svc = Service::new(
                Root::new(abs(root)?),
                vec![
                    exe.to_string_lossy().into_owned(),
                    "device".into(),
                    "worker".into(),
                ],
            );
            svc.serve()?;
            Ok(())
        }
        DeviceCmd::Attach {
            root,
            config,
            frontend,
            mount,
            id,
        } => {
            let config = abs(config)?;
            let mountpoint = mount.map(abs).transpose()?;
            let v = call(
                &Root::new(root),
                &Op::Attach {
                    config,
                    frontend,
                    mountpoint,
                    id,
                },
            )?;
            println!("id {}", v["id"].as_str().unwrap_or(""));
            println!("{}", v["device"].as_str().unwrap_or(""));
            Ok(())
        }
        DeviceCmd::Detach { root, device } => {
            let v = call(&Root::new(root), &Op::Detach { device })?;
            println!("detached {}", v["id"].as_str().unwrap_or(""));
            Ok(())
        }
        DeviceCmd::List { root, json } => {
            let root = Root::new(root);
            // Works without the service: the state is on disk.
            let devs = list(&root)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&devs)?);
                return Ok(());
            }
            println!(
                "{:<8} {:<12} {:<6} {:<4} {:>12}  config",
                "ID", "DEVICE", "FRONT", "MODE", "SIZE"
            );
            for d in devs {
                let r = &d.record;
                println!(
                    "{:<8} {:<12} {:<6} {:<4} {:>12}  {}{}",
                    r.id,
                    r.device.display(),
                    r.request.frontend,
                    if r.read_only { "ro" } else { "rw" },
                    r.size,
                    r.request.config.display(),
                    if d.alive { "" } else { "  (worker gone)" }
                );
            }
            Ok(())
        }
        DeviceCmd::Upgrade {
            root,
            devices,
            timeout,
        } => {
            let done = obd_device::service::upgrade(
                &Root::new(root),
                &devices,
                std::time::Duration::from_secs(timeout),
            )?;
            for (id, took) in done {
                println!("upgraded {id} in {} ms", took.as_millis());
            }
            Ok(())
        }
        DeviceCmd::Worker { root, id } => {
            let code = obd_device::worker::run(&Root::new(root), &id);
            std::process::exit(code);
        }
    }
}

fn abs(p: PathBuf) -> Result<PathBuf> {
    if p.is_absolute() {
        Ok(p)
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}
