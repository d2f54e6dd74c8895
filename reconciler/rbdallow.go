package reconciler

import (
	"fmt"
	"strings"

	"github.com/blktap-go/blktap/internal/rbdspec"
)

// Whoever can write a device's params names the pool (and the cluster,
// through conf=, id=, keyring=) an rbd: disk opens, with whatever the
// daemon's Ceph key reaches. As for nbd: sources, only what the operator
// allowed is opened: the pools of the rbd images the YAML file declares
// (root's file, like the image directories it implies) and what
// --rbd-allow names. Unset, nothing else: a toolstack or `blktap attach`
// naming an rbd image needs the operator's word first.

// RBDRule is one allowed place: a pool and namespace ("*": the whole
// pool) reached with exactly these connection options.
type RBDRule struct{ spec rbdspec.Spec }

// ParseRBDAllow reads --rbd-allow entries: POOL[/NAMESPACE|/*] ("*": the
// whole pool, the default namespace included) with the
// options of an image name (:conf=PATH:id=USER:keyring=PATH:mon_host=..)
// that a source must carry exactly (none: the defaults, no option given).
func ParseRBDAllow(entries []string) ([]RBDRule, error) {
	var rules []RBDRule
	for _, e := range entries {
		if e == "" {
			return nil, fmt.Errorf("--rbd-allow: an empty entry")
		}
		name, opts := splitFirstColon(e)
		if name == "" || strings.Count(name, "/") > 1 {
			return nil, fmt.Errorf("--rbd-allow %q: want POOL, POOL/NAMESPACE or POOL/* with optional :conf=..:id=.. options", e)
		}
		s, err := rbdspec.Parse(name + "/_" + opts)
		if err != nil {
			return nil, fmt.Errorf("--rbd-allow %q: %w", e, err)
		}
		s.Image = ""
		rules = append(rules, RBDRule{s})
	}
	return rules, nil
}

// splitFirstColon cuts s at its first ':' that no backslash escapes.
func splitFirstColon(s string) (string, string) {
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '\\':
			i++
		case ':':
			return s[:i], s[i:]
		}
	}
	return s, ""
}

func (r RBDRule) allows(s rbdspec.Spec) bool {
	a := r.spec
	return a.Pool == s.Pool && (a.Namespace == s.Namespace || a.Namespace == "*") &&
		a.Conf == s.Conf && a.ID == s.ID && a.Keyring == s.Keyring && a.MonHost == s.MonHost
}

func (r RBDRule) String() string {
	s := r.spec
	s.Image = "_"
	name, opts := splitFirstColon(s.String())
	return strings.TrimSuffix(name, "/_") + opts
}

// checkRBDSource allows an rbd: source in a pool the YAML's rbd disks
// use or --rbd-allow names.
func (d *Daemon) checkRBDSource(path string) error {
	s, err := rbdspec.Parse(path)
	if err != nil {
		return err
	}
	rules := append([]RBDRule(nil), d.opts.RBDAllow...)
	d.mu.Lock()
	for _, disk := range d.desired {
		if y, err := rbdspec.Parse(disk.Image); disk.Format == "rbd" && err == nil {
			y.Image, y.Snap = "", ""
			rules = append(rules, RBDRule{y})
		}
	}
	d.mu.Unlock()
	for _, r := range rules {
		if r.allows(s) {
			return nil
		}
	}
	where := s
	where.Snap, where.OpTimeout = "", ""
	return fmt.Errorf("rbd: pool %s: %w: add it to blktap run's --rbd-allow (or declare a disk in it in the YAML file)", RBDRule{where}, ErrNotAllowed)
}
