//go:build !containerd2

package conformance

// containerd 1.x: the suite and the proxy client at their 1.x import paths.

import (
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
)

type snapshotter = snapshots.Snapshotter

var (
	newProxy         = proxy.NewSnapshotter
	snapshotterSuite = testsuite.SnapshotterSuite
)
