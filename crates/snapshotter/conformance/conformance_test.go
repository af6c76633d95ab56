// Package conformance runs containerd's snapshotter conformance suite
// (github.com/containerd/containerd/snapshots/testsuite; in 2.x
// github.com/containerd/containerd/v2/core/snapshots/testsuite) against
// obd-snapshotter through containerd's own proxy snapshotter client, exactly as
// containerd talks to a proxy plugin. The imports of the version's packages
// live in containerd1.go and containerd2.go (build tag containerd2).
//
// Every test of the suite gets a fresh snapshotter root, so the harness starts
// one obd-snapshotter process per test (binary from $OBD_SNAPSHOTTER_BIN) with
// --root <root> --address <root>/obd.sock, and stops it in the cleanup.
//
// Build (GOPATH mode, offline, Debian's containerd sources):
//
//	GO111MODULE=off GOPATH=<private>:/usr/share/gocode GOPROXY=off go test -c -o conformance.test .
//
// and for containerd 2.x sources add -tags containerd2.
//
// Run as root: OBD_SNAPSHOTTER_BIN=.../obd-snapshotter ./conformance.test -test.v
package conformance

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

func startSnapshotter(ctx context.Context, bin, root string) (snapshotter, func() error, error) {
	sock := filepath.Join(root, "obd.sock")
	logPath := filepath.Join(filepath.Dir(root), "obd-snapshotter.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(bin, "--root", root, "--address", sock)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.Env = append(os.Environ(), "RUST_LOG=debug")
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, nil, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	stop := func() error {
		defer logFile.Close()
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			return err
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
			return fmt.Errorf("obd-snapshotter did not stop within 10 s of SIGTERM")
		}
	}

	// Wait (bounded) for the socket to accept a gRPC connection.
	dctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	dialer := func(ctx context.Context, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}
	connCh := make(chan *grpc.ClientConn, 1)
	errCh := make(chan error, 1)
	go func() {
		conn, err := grpc.DialContext(dctx, "unix://"+sock, grpc.WithInsecure(), grpc.WithBlock(), grpc.WithContextDialer(dialer),
			// Retry quickly while the snapshotter binds its socket.
			grpc.WithConnectParams(grpc.ConnectParams{
				Backoff:           backoff.Config{BaseDelay: 10 * time.Millisecond, Multiplier: 1.5, MaxDelay: 200 * time.Millisecond},
				MinConnectTimeout: time.Second,
			}))
		if err != nil {
			errCh <- err
			return
		}
		connCh <- conn
	}()
	var conn *grpc.ClientConn
	select {
	case conn = <-connCh:
	case err := <-errCh:
		_ = stop()
		return nil, nil, fmt.Errorf("connecting to %s: %w", sock, err)
	case err := <-exited:
		exited <- err
		_ = stop()
		log, _ := os.ReadFile(logPath)
		return nil, nil, fmt.Errorf("obd-snapshotter exited early (%v): %s", err, log)
	}

	sn := newProxy(snapshotsapi.NewSnapshotsClient(conn), "obd")
	cleanup := func() error {
		conn.Close()
		return stop()
	}
	return sn, cleanup, nil
}

func TestObdSnapshotter(t *testing.T) {
	bin := os.Getenv("OBD_SNAPSHOTTER_BIN")
	if bin == "" {
		t.Skip("OBD_SNAPSHOTTER_BIN is not set")
	}
	if os.Geteuid() != 0 {
		t.Skip("the snapshotter conformance suite needs root (mounts)")
	}
	snapshotterSuite(t, "obd", func(ctx context.Context, root string) (snapshotter, func() error, error) {
		return startSnapshotter(ctx, bin, root)
	})
}
