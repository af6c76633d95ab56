//! A CRI v1 test client that drives containerd as kubelet does: the
//! runtime service on containerd's socket, the image service on the
//! socket kubelet's `--image-service-endpoint` would name (containerd's
//! own, or obd-snapshotter's CRI image proxy). Blocking calls over the
//! generated tonic clients of `snapshotter::proto::runtime::v1`. Pods use
//! the host network namespace: no CNI.

use std::path::{Path, PathBuf};
use std::time::Duration;

use snapshotter::cri::unix_channel;
use snapshotter::proto::runtime::v1 as cri;
use tonic::transport::Channel;

use cri::image_service_client::ImageServiceClient;
use cri::runtime_service_client::RuntimeServiceClient;

/// The CRI client (one tokio runtime for its calls).
pub struct Kubelet {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

type Res<T> = Result<T, tonic::Status>;

impl Kubelet {
    /// A client of the runtime service on `runtime` and the image service
    /// on `images` (unix sockets; connected at the first call).
    pub fn new(runtime: &Path, images: &Path) -> Kubelet {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let (runtime, images) = rt.block_on(async {
            (
                RuntimeServiceClient::new(unix_channel(runtime)),
                ImageServiceClient::new(unix_channel(images)),
            )
        });
        Kubelet {
            rt,
            runtime,
            images,
        }
    }

    /// `Version` (the runtime answers when its CRI plugin is up).
    pub fn version(&self) -> Res<cri::VersionResponse> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(c.version(cri::VersionRequest {
                version: "v1".into(),
            }))
            .map(|r| r.into_inner())
    }

    /// Waits (up to `timeout`) until `Version` and `ImageFsInfo` answer.
    pub fn wait_ready(&self, timeout: Duration) {
        let mut last = String::new();
        let ok = fixtures::procs::poll(timeout, || {
            match self.version().and_then(|_| self.image_fs_info()) {
                Ok(_) => true,
                Err(e) => {
                    last = e.to_string();
                    false
                }
            }
        });
        assert!(ok, "CRI did not answer within {timeout:?}: {last}");
    }

    /// `RunPodSandbox`; the sandbox id.
    pub fn run_pod_sandbox(&self, config: &cri::PodSandboxConfig) -> Res<String> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(c.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            }))
            .map(|r| r.into_inner().pod_sandbox_id)
    }

    /// `PullImage` of `image` for the pod `sandbox`, with `auth` as a pull
    /// secret gives it; the image ref (digest) containerd reports.
    pub fn pull_image(
        &self,
        image: &str,
        auth: Option<cri::AuthConfig>,
        sandbox: &cri::PodSandboxConfig,
    ) -> Res<String> {
        let mut c = self.images.clone();
        self.rt
            .block_on(c.pull_image(cri::PullImageRequest {
                image: Some(image_spec(image)),
                auth,
                sandbox_config: Some(sandbox.clone()),
            }))
            .map(|r| r.into_inner().image_ref)
    }

    /// `CreateContainer` in the pod `pod_id`; the container id.
    pub fn create_container(
        &self,
        pod_id: &str,
        config: &cri::ContainerConfig,
        sandbox: &cri::PodSandboxConfig,
    ) -> Res<String> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(c.create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod_id.into(),
                config: Some(config.clone()),
                sandbox_config: Some(sandbox.clone()),
            }))
            .map(|r| r.into_inner().container_id)
    }

    /// `StartContainer`.
    pub fn start_container(&self, id: &str) -> Res<()> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(c.start_container(cri::StartContainerRequest {
                container_id: id.into(),
            }))
            .map(|_| ())
    }

    /// `ContainerStatus`.
    pub fn container_status(&self, id: &str) -> Res<cri::ContainerStatus> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(c.container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            }))
            .map(|r| r.into_inner().status.unwrap_or_default())
    }

    /// Waits (up to `timeout`) until the container has exited; its status.
    pub fn wait_exited(&self, id: &str, timeout: Duration) -> cri::ContainerStatus {
        let mut st = cri::ContainerStatus::default();
        let exited = cri::ContainerState::ContainerExited as i32;
        let ok = fixtures::procs::poll(timeout, || {
            st = self.container_status(id).expect("ContainerStatus");
            st.state == exited
        });
        assert!(ok, "container {id} did not exit within {timeout:?}: {st:?}");
        st
    }

    /// `ImageFsInfo`.
    pub fn image_fs_info(&self) -> Res<cri::ImageFsInfoResponse> {
        let mut c = self.images.clone();
        self.rt
            .block_on(c.image_fs_info(cri::ImageFsInfoRequest {}))
            .map(|r| r.into_inner())
    }

    /// `ImageStatus`: the image, if CRI knows it.
    pub fn image_status(&self, image: &str) -> Res<Option<cri::Image>> {
        let mut c = self.images.clone();
        self.rt
            .block_on(c.image_status(cri::ImageStatusRequest {
                image: Some(image_spec(image)),
                verbose: false,
            }))
            .map(|r| r.into_inner().image)
    }

    /// `StopPodSandbox`.
    pub fn stop_pod_sandbox(&self, id: &str) -> Res<()> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(c.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            }))
            .map(|_| ())
    }

    /// `RemovePodSandbox` (its containers go with it).
    pub fn remove_pod_sandbox(&self, id: &str) -> Res<()> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(c.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            }))
            .map(|_| ())
    }

    /// `RemoveImage`.
    pub fn remove_image(&self, image: &str) -> Res<()> {
        let mut c = self.images.clone();
        self.rt
            .block_on(c.remove_image(cri::RemoveImageRequest {
                image: Some(image_spec(image)),
            }))
            .map(|_| ())
    }
}

fn image_spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.into(),
        ..Default::default()
    }
}

/// Host network namespace, as `hostNetwork: true` pods have.
fn host_network() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Node as i32,
        ..Default::default()
    }
}

/// A pod `name` (namespace `obd-test`) on the host network, its container
/// logs under `log_dir`.
pub fn pod_config(name: &str, log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "obd-test".into(),
            attempt: 0,
        }),
        // No hostname: a host-network pod has the node's (runc cannot set
        // one without a private UTS namespace).
        log_directory: log_dir.to_string_lossy().into_owned(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(host_network()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container `name` of `image` running `command`, logging to
/// `<pod log dir>/<name>.log`.
pub fn container_config(name: &str, image: &str, command: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(image_spec(image)),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(host_network()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The log file CRI writes for container `name` of a pod logging to
/// `log_dir`.
pub fn log_file(log_dir: &Path, name: &str) -> PathBuf {
    log_dir.join(format!("{name}.log"))
}

/// The lines of a CRI container log (`<RFC 3339 time> <stream> <P|F>
/// <text>`) as `(stream, text)`; partial (`P`) lines are joined with what
/// follows. Panics on a line of another format.
pub fn read_log(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out: Vec<(String, String)> = Vec::new();
    let mut partial: Option<(String, String)> = None;
    for l in text.lines() {
        let mut f = l.splitn(4, ' ');
        let (Some(_time), Some(stream), Some(tag), Some(msg)) =
            (f.next(), f.next(), f.next(), Some(f.next().unwrap_or("")))
        else {
            panic!("{}: not a CRI log line: {l:?}", path.display());
        };
        assert!(
            matches!(stream, "stdout" | "stderr") && matches!(tag, "P" | "F"),
            "{}: not a CRI log line: {l:?}",
            path.display()
        );
        let mut cur = partial
            .take()
            .unwrap_or_else(|| (stream.to_string(), String::new()));
        cur.1.push_str(msg);
        if tag == "P" {
            partial = Some(cur);
        } else {
            out.push(cur);
        }
    }
    out
}
