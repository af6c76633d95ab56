//go:build containerd2

package conformance

// containerd 2.x (module github.com/containerd/containerd/v2): the suite and the proxy client under core/.

import (
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
)

type snapshotter = snapshots.Snapshotter

var (
	newProxy         = proxy.NewSnapshotter
	snapshotterSuite = testsuite.SnapshotterSuite
)
