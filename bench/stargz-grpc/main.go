// A minimal containerd-stargz-grpc for bench/coldstart.sh: Debian ships the
// stargz-snapshotter library (golang-github-containerd-stargz-snapshotter-dev)
// but not this daemon. It serves the stargz snapshotter on a unix socket as
// a containerd proxy plugin; `-plain-http HOST` makes HOST a plain-HTTP
// registry. Built offline in GOPATH mode from Debian's Go packages by
// bench/stargz-grpc/build.sh.
package main

import (
	"context"
	"flag"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"net/http"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	stargzfs "github.com/containerd/stargz-snapshotter/fs"
	fsconfig "github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/layer"
	"github.com/containerd/stargz-snapshotter/fs/source"
	snbase "github.com/containerd/stargz-snapshotter/snapshot"
	"google.golang.org/grpc"
)

// hosts: the reference's registry, over plain HTTP when it is `plain`
// (the library's service/resolver package needs k8s cri-api, which Debian
// does not package, so this is its resolver without CRI or credentials).
func hosts(plain string) source.RegistryHosts {
	return func(ref reference.Spec) ([]docker.RegistryHost, error) {
		h := ref.Hostname()
		scheme := "https"
		if h == plain {
			scheme = "http"
		}
		// The library wraps Client.Transport: it must be set.
		client := &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone(), Timeout: 30 * time.Second}
		return []docker.RegistryHost{{
			Client:       client,
			Host:         h,
			Scheme:       scheme,
			Path:         "/v2",
			Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve,
			Authorizer:   docker.NewDockerAuthorizer(docker.WithAuthClient(client)),
		}}, nil
	}
}

func main() {
	root := flag.String("root", "/var/lib/containerd-stargz-grpc", "state directory")
	address := flag.String("address", "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock", "gRPC socket")
	plain := flag.String("plain-http", "", "registry host[:port] spoken to over plain HTTP")
	flag.Parse()
	ctx := log.WithLogger(context.Background(), log.L)

	fs, err := stargzfs.NewFilesystem(filepath.Join(*root, "stargz"), fsconfig.Config{},
		stargzfs.WithGetSources(source.FromDefaultLabels(hosts(*plain))),
		stargzfs.WithOverlayOpaqueType(layer.OverlayOpaqueTrusted))
	if err != nil {
		log.G(ctx).WithError(err).Fatal("configuring the stargz filesystem")
	}
	rs, err := snbase.NewSnapshotter(ctx, filepath.Join(*root, "snapshotter"), fs, snbase.AsynchronousRemove)
	if err != nil {
		log.G(ctx).WithError(err).Fatal("creating the stargz snapshotter")
	}
	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(rs))
	if err := os.MkdirAll(filepath.Dir(*address), 0o700); err != nil {
		log.G(ctx).WithError(err).Fatal("socket directory")
	}
	_ = os.Remove(*address)
	l, err := net.Listen("unix", *address)
	if err != nil {
		log.G(ctx).WithError(err).Fatal("listening")
	}
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
		rpc.Stop()
	}()
	if err := rpc.Serve(l); err != nil {
		log.G(ctx).WithError(err).Error("serving")
	}
	if err := rs.Close(); err != nil {
		log.G(ctx).WithError(err).Error("closing")
	}
}
