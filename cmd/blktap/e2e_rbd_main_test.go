//go:build rbd

package main

import (
	"os"
	"testing"

	"github.com/blktap-go/blktap/internal/cephdev"
)

// TestMain stops the Ceph cluster the rbd tests started, if they did.
func TestMain(m *testing.M) {
	code := m.Run()
	cephdev.Stop()
	os.Exit(code)
}
