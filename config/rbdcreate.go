package config

import (
	"strings"

	"github.com/blktap-go/blktap/internal/rbdspec"
	"gopkg.in/yaml.v3"
)

// rbdCreateKeys are the keys create: takes beyond size on an rbd disk:
// `image create -f rbd -o`'s keys, spelled with dashes as the file's
// other keys are (object-size for object_size, and so on).
var rbdCreateKeys = []string{"object-size", "cluster-size", "order", "features", "stripe-unit", "stripe-count", "data-pool"}

// rbdCreate reads an rbd disk's create options into c.RBD and checks
// them by the rules Create applies, so a bad value is refused when the
// file is read, at its line, rather than each time the daemon retries.
func (p *parser) rbdCreate(m map[string]*yaml.Node, what string, c *Create) {
	o := &c.RBD
	o.Size = c.Size
	var at *yaml.Node // where a combination error points
	for _, k := range []string{"object-size", "cluster-size"} {
		if v, ok := m[k]; ok {
			if o.ObjectSize != 0 {
				p.errf(v, "%s: create: object-size, cluster-size and order name one thing: give one", what)
			}
			o.ObjectSize, _ = p.size(v, what+": create: "+k)
			at = v
		}
	}
	if v, ok := m["order"]; ok {
		if o.ObjectSize != 0 {
			p.errf(v, "%s: create: object-size, cluster-size and order name one thing: give one", what)
		}
		if n, ok := p.integer(v, what+": create: order", 12, 25); ok {
			o.ObjectSize = 1 << n
		}
		at = v
	}
	if v, ok := m["features"]; ok {
		o.Features = p.rbdFeatures(v, what+": create: features")
		at = v
	}
	if v, ok := m["stripe-unit"]; ok {
		o.StripeUnit, _ = p.size(v, what+": create: stripe-unit")
		at = v
	}
	if v, ok := m["stripe-count"]; ok {
		o.StripeCount, _ = p.integer(v, what+": create: stripe-count", 1, 1<<20)
		at = v
	}
	if v, ok := m["data-pool"]; ok {
		o.DataPool, _ = p.str(v, what+": create: data-pool")
		at = v
	}
	if at == nil {
		return
	}
	if err := o.Check(); err != nil {
		p.errf(at, "%s: create: %v", what, err)
	}
}

// rbdFeatures reads features as a list ([layering, exclusive-lock]) or as
// -o's string joined with '+'.
func (p *parser) rbdFeatures(n *yaml.Node, what string) []string {
	var names []string
	switch {
	case n.Kind == yaml.SequenceNode:
		for _, e := range n.Content {
			if s, ok := p.str(e, what); ok {
				names = append(names, s)
			}
		}
		if len(names) == 0 {
			p.errf(n, "%s is empty (leave it out for the pool's defaults)", what)
			return nil
		}
	default:
		s, ok := p.str(n, what)
		if !ok {
			return nil
		}
		names = []string{s}
	}
	fs, err := rbdspec.ParseFeatures(strings.Join(names, "+"))
	if err != nil {
		p.errf(n, "%s: %v", what, err)
		return nil
	}
	return fs
}

// notRBDCreate refuses rbd's create keys on another format's disk.
func (p *parser) notRBDCreate(m map[string]*yaml.Node, what, format string) {
	for _, k := range rbdCreateKeys {
		if v, ok := m[k]; ok {
			p.errf(v, "%s: create: %s is an rbd image's option; a %s disk does not take it", what, k, format)
		}
	}
}
